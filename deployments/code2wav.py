"""The Code2Wav deployment: pulls codec frames from the talker and streams PCM to the ingress.

Frames are decoded incrementally (`Code2WavStream` carries the convolution and attention state, so the
concatenated chunks equal a full decode) on the `CodecChunking` schedule of the settings: a small first chunk for
a short time to first audio, larger ones after. `ChunkedDecode` makes the same calls however the frames arrive and
`OmniModel.generate` decodes with it too, so a greedy reply's samples equal OmniModel's bit for bit. Text deltas
and the upstream stages' times pass straight through.
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
from deployments.runtime import STAGE_DEFAULTS, StageReplica
from deployments.settings import ServiceSettings
from deployments.timeline import StageClock, StageTimes
from stages.code2wav import ChunkedDecode, Code2Wav
from stages.omni import SAMPLE_RATE

logger = logging.getLogger("ray.serve")


@serve.deployment(name="code2wav", **STAGE_DEFAULTS)
class Code2WavStage(StageReplica):
    stage_name = "code2wav"

    def __init__(self, settings: dict, talker: DeploymentHandle):
        self._start(ServiceSettings.model_validate(settings), build=lambda cfg: Code2Wav(cfg.code2wav_config))
        self.talker = talker

    async def synthesize(self, job: SpeechJob):
        """Yields TextDelta and StageTimes (passed through), PcmChunk events, and last this stage's StageTimes."""
        logger.info("code2wav: %s", job.request_id)
        with self.serving(job.request_id) as clock:
            async for event in self._synthesize(job, clock):
                if isinstance(event, PcmChunk):
                    clock.mark("first_out")
                yield event
            yield self.finish_times(clock)

    async def _synthesize(self, job: SpeechJob, clock: StageClock):
        decoder = ChunkedDecode(self.stage.module, self.settings.codec_chunking())
        async for event in self.talker.options(stream=True).speak.remote(job):
            if isinstance(event, (TextDelta, StageTimes)):
                yield event
                continue
            assert isinstance(event, CodecFrames)
            clock.mark("first_frames")
            samples = await asyncio.to_thread(self._decode, decoder, event.codes, event.finished)
            if samples.size or event.finished:
                yield PcmChunk(job.request_id, samples, SAMPLE_RATE, finished=event.finished)
        if decoder.pending_frames:  # the talker ended without marking its last frames finished
            samples = await asyncio.to_thread(self._decode, decoder, None, True)
            yield PcmChunk(job.request_id, samples, SAMPLE_RATE, finished=True)

    @torch.inference_mode()
    def _decode(self, decoder: ChunkedDecode, codes: torch.Tensor | None, last: bool) -> np.ndarray:
        """The samples of the schedule's calls that `codes [Q, F]` complete; all the rest when `last`."""
        before = decoder.frames
        pieces = [] if codes is None else [decoder.push(codes[None].to(self.stage.device))]  # [1, S]
        if last:
            pieces.append(decoder.finish())
        if decoder.frames > before:
            self.metrics.stage_tokens("code2wav", decoder.frames - before)
        return torch.cat(pieces, dim=-1)[0].float().cpu().numpy() if pieces else np.zeros(0, np.float32)
