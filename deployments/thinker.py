"""The thinker deployment: fetches the encoder outputs by reference, prefills, decodes, and streams.

For a text reply it yields `TextDelta`s to the ingress. For a spoken one the caller is the talker, and it yields
`TalkerInput`s: the text, plus the talker's inputs (the `TalkerPrompt` in the first, then `ThinkerTokens`, the
last with finished=True). A job resumed from the first tokens of its reply (`deployments.resume`) gets the text of
the tokens after them only, and, for a talker, the talker inputs of the whole reply (its first `ThinkerTokens`
holds the resumed tokens too). Each send carries every token produced since the last one (one `TextDelta`, one
`ThinkerTokens` of n tokens), so a reply costs a message per batch of ready steps, not per token, and nothing
waits to fill one. Text is detokenized here, so stop sequences end generation where they appear. The last event
is the stage's `StageTimes`.

A job with a `session` is routed to the replica that keeps the session's KV (`deployments.session_routing`), whose
engine prefills only what the conversation added since (`stages.thinker_sessions`); `end_session` frees it.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from dataclasses import fields, replace

import torch
from ray import serve
from ray.actor import ActorHandle
from ray.serve.config import RequestRouterConfig

from common.messages import ThinkerTokens
from common.tokenizer import OmniTokenizer
from deployments.jobs import TalkerInput, TextDelta, ThinkerJob
from deployments.resume import EncoderLostError, replica_lost
from deployments.runtime import STAGE_DEFAULTS, StageReplica
from deployments.session_routing import SessionAffinityRouter
from deployments.settings import ServiceSettings
from deployments.stop_strings import ReplyText
from deployments.timeline import StageClock
from stages.compile import compile_enabled
from stages.thinker import ThinkerLM, ThinkerPrompt
from stages.thinker_engine import ThinkerEngine
from stages.thinker_sessions import SessionStore

logger = logging.getLogger("ray.serve")


@serve.deployment(name="thinker", request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
                  **STAGE_DEFAULTS)
class ThinkerStage(StageReplica):
    stage_name = "thinker"

    def __init__(self, settings: dict):
        self._start(ServiceSettings.model_validate(settings), build=lambda cfg: ThinkerLM(cfg.thinker_config))
        config = self.stage.config
        self.accept_hidden_layer = config.talker_config.accept_hidden_layer if config.has_talker else None
        self.tokenizer = OmniTokenizer.from_pretrained(self.stage.checkpoint)
        context = config.thinker_config.text_config.max_position_embeddings
        settings = self.settings
        sessions = SessionStore(settings.thinker_kept_sessions, settings.thinker_kept_session_tokens,
                                settings.thinker_session_idle_s)
        self.engine = ThinkerEngine(self.stage.module, max_rows=settings.thinker_batch_rows,
                                    max_len=min(settings.thinker_batch_max_len, context),
                                    accept_hidden_layer=self.accept_hidden_layer,
                                    compiled=compile_enabled(settings.compile, self.stage.device, self.stage.dtype),
                                    sessions=sessions)

    async def generate(self, job: ThinkerJob, consumer: ActorHandle | None = None):
        """The reply's events (see the module docstring); `consumer`: the replica reading them, watched
        (`deployments.resume`)."""
        logger.info("thinker: %s (%s)", job.request_id, "for the talker" if job.for_talker else "text")
        with self.serving(job.request_id) as clock:
            async for event in self.while_consumer_lives(job.request_id, self._generate(job, clock), consumer):
                clock.mark("first_out")
                yield event
            yield self.finish_times(clock)

    async def end_session(self, session: str) -> None:
        """Free what this replica keeps of a session (its client closed it). Call it with `session=` as a keyword:
        the router sends it to the session's replica."""
        self.engine.end_session(session)

    def describe(self, session: str | None = None) -> dict:
        """`StageReplica.describe`, plus this replica's kept sessions (tokens each) with the prompt tokens of session
        turns, reused or all. `session=`: ask the replica that session is routed to."""
        return {**super().describe(), "sessions": self.engine.sessions.summary()}

    async def _generate(self, job: ThinkerJob, clock: StageClock):
        """One message of each kind per batch of ready steps: every token since the last send goes out at once."""
        if job.resume.finish_reason is not None and not job.for_talker:
            return  # resumed with the whole text: nothing left to send
        prompt = await self._prompt(job)
        clock.mark("prompt")
        prompt_tokens = int(prompt.input_ids.shape[1])
        if job.resume.finish_reason is not None:
            async for event in self._talker_inputs_of_ended(job, prompt, prompt_tokens, clock):
                yield event
            return
        reply = ReplyText(self.tokenizer, job.stop_strings, job.sampling.stop_token_ids)
        reply.replay(job.resume.tokens)  # their text was sent before the replica that sent it was lost
        first = True
        async with aclosing(self._steps(job, prompt, clock)) as steps:  # closed at once, even on an early return
            async for ready in steps:
                clock.mark("first_token")
                text, tokens, talker_prompt = _Delta(job.request_id, prompt_tokens), [], None
                if first:
                    text.cached_tokens = ready[0].cached_tokens
                    if job.session is not None:
                        self.metrics.session_turn(prompt_tokens, ready[0].cached_tokens)
                first = False
                for step in ready:
                    ids, piece, reason, hit_stop_string = reply.add(step.token_ids[0], step.finish_reasons[0])
                    text.add(ids, piece, reason)
                    if job.for_talker:
                        if step.talker_prompts is not None:
                            talker_prompt = _on_host(step.talker_prompts[0])
                        tokens.append(step.talker_tokens[0])
                        if hit_stop_string:  # the reply ends on an ordinary token, which is voiced
                            tokens[-1] = replace(tokens[-1], finished=True, finish_reason="stop_sequence")
                    if reason is not None:  # the steps after a stop sequence are not the reply's
                        break
                clock.outputs += len(ready)
                if job.for_talker:
                    yield TalkerInput(text.delta(), _on_host(_joined(tokens)), talker_prompt)
                else:
                    yield text.delta()
                if text.finish_reason is not None:
                    return

    async def _talker_inputs_of_ended(self, job: ThinkerJob, prompt: ThinkerPrompt, prompt_tokens: int,
                                      clock: StageClock):
        """For a talker resumed below a reply whose text had ended: the talker inputs of the whole reply, in one
        `TalkerInput` with no text."""
        async with aclosing(self._steps(job, prompt, clock)) as steps:
            async for ready in steps:
                step = ready[0]
                text = TextDelta(job.request_id, "", [], prompt_tokens, job.resume.finish_reason)
                yield TalkerInput(text, _on_host(step.talker_tokens[0]), _on_host(step.talker_prompts[0]))

    def _steps(self, job: ThinkerJob, prompt: ThinkerPrompt, clock: StageClock):
        """The request's steps from the replica's engine, in lists of those ready (a request too long for a row of
        its batch runs there too, in a cache of its own)."""
        resume = job.resume
        return self.engine_steps(job.request_id, lambda sink: self.engine.submit(
            job.request_id, prompt, job.sampling, job.for_talker, sink, session=job.session,
            resume_tokens=resume.tokens, ended=resume.finish_reason is not None), clock)

    async def _prompt(self, job: ThinkerJob) -> ThinkerPrompt:
        """The processor's tensors plus the encoder outputs, fetched from the object store, on this device."""
        device = self.stage.device
        inputs = {k: v.to(device) for k, v in job.inputs.items()}
        image, video = [await _encoded(ref) for ref in (job.image_embeds, job.video_embeds)]
        audio = torch.cat([await _encoded(ref) for ref in job.audio_embeds]) if job.audio_embeds else None  # [N, H]
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


async def _encoded(ref):
    """An encoder's output, by its reference (None for none); `EncoderLostError` when the encoder's replica was lost
    before it was done, for the ingress to run the encoders again."""
    if ref is None:
        return None
    try:
        return await ref
    except Exception as exc:
        if replica_lost(exc):
            raise EncoderLostError("an encoder replica was lost before its output was ready") from exc
        raise


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _on_host(message):
    """A message with its tensors in host memory: the object store is host memory, and the next stage may sit on
    another GPU or another node."""
    tensors = {f.name: getattr(message, f.name) for f in fields(message)}
    return replace(message, **{k: v.cpu() for k, v in tensors.items() if isinstance(v, torch.Tensor)})


class _Delta:
    """The reply's text and ids of one batch of steps, sent as one `TextDelta`."""

    def __init__(self, request_id: str, prompt_tokens: int):
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.text, self.token_ids, self.finish_reason = "", [], None
        self.cached_tokens: int | None = None  # the run's first delta only

    def add(self, ids: list[int], text: str, reason: str | None) -> None:
        self.text += text
        self.token_ids += ids
        self.finish_reason = reason

    def delta(self) -> TextDelta:
        return TextDelta(self.request_id, self.text, self.token_ids, self.prompt_tokens, self.finish_reason,
                         self.cached_tokens)


def _joined(chunks: list[ThinkerTokens]) -> ThinkerTokens:
    """Consecutive chunks of one reply as one (the last one's finish)."""
    last = chunks[-1]
    ids = [i for chunk in chunks for i in chunk.token_ids]
    embeds = torch.cat([chunk.token_embeds for chunk in chunks])  # [n, H]
    return ThinkerTokens(last.request_id, ids, embeds, last.finished, last.finish_reason)
