"""The thinker deployment: fetches the encoder outputs by reference, prefills, decodes, and streams.

For a text reply it yields `TextDelta`s to the ingress. For a spoken one the caller is the talker, and it also
yields the talker's inputs: one `TalkerPrompt` after the prefill, then one `ThinkerTokens` per token (the last
with finished=True). Text is detokenized here, so stop sequences end generation where they appear.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch
from ray import serve

from common.tokenizer import OmniTokenizer
from deployments.jobs import TextDelta, ThinkerJob
from deployments.metrics import service_metrics
from deployments.runtime import STAGE_DEFAULTS, describe, load_stage
from deployments.settings import ServiceSettings
from deployments.stop_strings import StopStrings
from stages.thinker import ThinkerLM, ThinkerPrompt, stream_generate


@serve.deployment(name="thinker", **STAGE_DEFAULTS)
class ThinkerStage:
    def __init__(self, settings: dict):
        self.stage = load_stage(
            ServiceSettings.model_validate(settings), "thinker", lambda cfg: ThinkerLM(cfg.thinker_config)
        )
        config = self.stage.config
        self.accept_hidden_layer = config.talker_config.accept_hidden_layer if config.has_talker else None
        self.tokenizer = OmniTokenizer.from_pretrained(self.stage.checkpoint)
        self.metrics = service_metrics()

    async def generate(self, job: ThinkerJob):
        self.metrics.stage_requests.inc(1, tags={"stage": "thinker"})
        prompt = await self._prompt(job)
        steps = stream_generate(
            self.stage.module, prompt, [job.sampling], request_ids=[job.request_id], speaking=[job.for_talker],
            accept_hidden_layer=self.accept_hidden_layer if job.for_talker else None,
        )
        detokenizer = self.tokenizer.stream(skip_special_tokens=True)
        stops = StopStrings(job.stop_strings)
        prompt_tokens = int(prompt.input_ids.shape[1])
        try:
            while (step := await asyncio.to_thread(next, steps, None)) is not None:
                token, reason = step.token_ids[0], step.finish_reasons[0]
                # the stop token ends the reply but is not part of it (OmniModel.generate's token_ids agree)
                ids = [] if reason == "stop" and token in job.sampling.stop_token_ids else [token]
                piece = detokenizer.push(ids) + (detokenizer.flush() if reason is not None else "")
                text, hit = stops.push(piece)
                if hit:
                    reason = "stop"
                elif reason is not None:
                    text += stops.flush()  # held-back text that turned out not to start a stop sequence
                if job.for_talker:
                    if step.talker_prompts is not None:
                        yield step.talker_prompts[0]
                    tokens = step.talker_tokens[0]
                    # a stop sequence ends the reply on an ordinary token, which is voiced (only a "stop"
                    # finish drops its last token, the stop token)
                    yield replace(tokens, finished=True, finish_reason="stop_sequence") if hit else tokens
                self.metrics.stage_tokens("thinker", 1)
                yield TextDelta(job.request_id, text, ids, prompt_tokens, reason)
                if reason is not None:
                    return
        finally:
            try:
                steps.close()
            except ValueError:  # cancelled while a step runs in its thread; the generator is collected after it
                pass

    async def _prompt(self, job: ThinkerJob) -> ThinkerPrompt:
        """The processor's tensors plus the encoder outputs, fetched from the object store, on this device."""
        device = self.stage.device
        inputs = {k: v.to(device) for k, v in job.inputs.items()}
        image = await job.image_embeds if job.image_embeds is not None else None
        video = await job.video_embeds if job.video_embeds is not None else None
        audio = await job.audio_embeds if job.audio_embeds is not None else None
        mask = inputs.get("feature_attention_mask")
        return ThinkerPrompt(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            audio_features=_on(audio, device),
            audio_feature_lengths=mask.sum(-1) if mask is not None else None,
            image_features=_on(image[0], device) if image else None,
            image_deepstack=[_on(level, device) for level in image[1]] if image else None,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_features=_on(video[0], device) if video else None,
            video_deepstack=[_on(level, device) for level in video[1]] if video else None,
            video_grid_thw=inputs.get("video_grid_thw"),
            video_second_per_grid=inputs.get("video_second_per_grid"),
            use_audio_in_video=job.use_audio_in_video,
        )

    def ready(self) -> bool:
        return True

    def describe(self) -> dict:
        return describe("thinker", self.stage.module)


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
