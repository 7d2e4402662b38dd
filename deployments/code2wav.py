"""The Code2Wav deployment: pulls codec frames from the talker and streams PCM to the ingress.

Frames are decoded incrementally (`Code2WavStream` carries the convolution and attention state, so the
concatenated chunks equal a full decode sample for sample): a small first chunk for a short time to first
audio, larger ones after. Text deltas from upstream pass straight through.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from common.messages import CodecFrames
from deployments.jobs import PcmChunk, SpeechJob, TextDelta
from deployments.metrics import service_metrics
from deployments.runtime import STAGE_DEFAULTS, describe, load_stage
from deployments.settings import ServiceSettings
from stages.code2wav import Code2Wav, Code2WavStream
from stages.omni import SAMPLE_RATE

logger = logging.getLogger("ray.serve")


@serve.deployment(name="code2wav", **STAGE_DEFAULTS)
class Code2WavStage:
    def __init__(self, settings: dict, talker: DeploymentHandle):
        self.settings = ServiceSettings.model_validate(settings)
        self.stage = load_stage(self.settings, "code2wav", lambda cfg: Code2Wav(cfg.code2wav_config))
        self.talker = talker
        self.metrics = service_metrics()

    async def synthesize(self, job: SpeechJob):
        """Yields TextDelta (passed through) and PcmChunk events for one spoken reply."""
        self.metrics.stage_requests.inc(1, tags={"stage": "code2wav"})
        logger.info("code2wav: %s", job.request_id)
        stream = Code2WavStream(self.stage.module)
        pending: list[torch.Tensor] = []  # [Q, F] pieces not decoded yet
        chunk = self.settings.codec_initial_chunk_frames
        async for event in self.talker.options(stream=True).speak.remote(job):
            if isinstance(event, TextDelta):
                yield event
                continue
            assert isinstance(event, CodecFrames)
            pending.append(event.codes)
            frames = sum(p.shape[-1] for p in pending)
            if frames >= chunk or event.finished:
                codes = torch.cat(pending, dim=-1)  # [Q, F]
                pending = []
                samples = await asyncio.to_thread(self._push, stream, codes)
                self.metrics.stage_tokens("code2wav", frames)
                yield PcmChunk(job.request_id, samples, SAMPLE_RATE, finished=event.finished)
                chunk = self.settings.codec_chunk_frames
        if pending:  # the talker ended without marking its last frames finished
            samples = await asyncio.to_thread(self._push, stream, torch.cat(pending, dim=-1))
            yield PcmChunk(job.request_id, samples, SAMPLE_RATE, finished=True)

    @torch.inference_mode()
    def _push(self, stream: Code2WavStream, codes: torch.Tensor) -> np.ndarray:
        wav = stream.push(codes[None].to(self.stage.device))  # [1, S]
        return wav[0].float().cpu().numpy()

    def ready(self) -> bool:
        return True

    def describe(self) -> dict:
        return describe("code2wav", self.stage.module)
