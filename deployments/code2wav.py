"""The Code2Wav deployment: pulls codec frames from the talker and streams PCM to the ingress.

One `Code2WavEngine` per replica decodes the frames of all its requests, batching their calls, on the
`CodecChunking` schedule of the settings (a 1-frame first call for a short time to first audio, then larger
ones). Each request's samples are the ones it gets alone, and `OmniModel.generate` decodes with the same engine,
so a greedy reply's samples equal OmniModel's bit for bit. Text deltas and the upstream stages' times pass straight
through, and the talker's frames go on to the ingress with the next chunk (`PcmChunk.codes`). When the talker's
replica is lost, the talker is resumed (`deployments.resume`) with the frames received, and sends the frames after
them; a job resumed after a lost Code2Wav comes with the frames its ingress had (`SpeechJob.frames`): they are
decoded again and the talker is resumed from them.
"""

from __future__ import annotations

import asyncio
import logging

import torch
from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from common.messages import CodecFrames
from deployments.jobs import PcmChunk, SpeechJob, TextDelta, coalesced, resumed
from deployments.resume import relayed, resuming
from deployments.runtime import STAGE_DEFAULTS, StageReplica, all_ready
from deployments.settings import ServiceSettings
from deployments.timeline import StageClock, StageTimes
from stages.code2wav import Code2Wav
from stages.code2wav_engine import Code2WavEngine
from stages.omni import SAMPLE_RATE

logger = logging.getLogger("ray.serve")


@serve.deployment(name="code2wav", **STAGE_DEFAULTS)
class Code2WavStage(StageReplica):
    stage_name = "code2wav"

    def __init__(self, settings: dict, talker: DeploymentHandle):
        self._start(ServiceSettings.model_validate(settings), build=lambda cfg: Code2Wav(cfg.code2wav_config))
        self.engine = Code2WavEngine(self.stage.module, self.settings.codec_chunking())
        self.talker = talker

    async def synthesize(self, job: SpeechJob, consumer: ActorHandle | None = None):
        """Yields TextDelta and StageTimes (passed through), PcmChunk events, and last this stage's StageTimes.
        `consumer`: the replica reading them, watched (`deployments.resume`)."""
        logger.info("code2wav: %s", job.request_id)
        with self.serving(job.request_id) as clock:
            async for event in self.while_consumer_lives(job.request_id, self._synthesize(job, clock), consumer):
                if isinstance(event, PcmChunk):
                    clock.mark("first_out")
                yield event
            yield self.finish_times(clock)

    async def _synthesize(self, job: SpeechJob, clock: StageClock):
        """Feeds the talker's frames to the engine while yielding its pieces (and the text) as they come."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        self.engine.submit(job.request_id, lambda piece: loop.call_soon_threadsafe(events.put_nowait, piece))
        feeding = asyncio.create_task(self._feed(job, events, clock))
        talker_done = speech_done = False
        frames_in: list[torch.Tensor] = []  # the talker's frames since the last chunk, passed on with the next
        with self.in_engine_for(job.request_id):
            try:
                while not (talker_done and speech_done):
                    for event in coalesced(await all_ready(events)):  # the text behind as one delta
                        if isinstance(event, BaseException):
                            raise event
                        if event is None:
                            talker_done = True
                        elif isinstance(event, (TextDelta, StageTimes)):
                            yield event
                        elif isinstance(event, torch.Tensor):
                            frames_in.append(event)
                        else:
                            clock.outputs += event.frames
                            speech_done = event.finished
                            if event.samples.numel() or event.finished:
                                codes = torch.cat(frames_in, dim=1) if frames_in else None  # [G, f]
                                frames_in.clear()
                                yield PcmChunk(job.request_id, event.samples.float().cpu().numpy(), SAMPLE_RATE,
                                               finished=event.finished, codes=codes)
            finally:
                feeding.cancel()

    async def _feed(self, job: SpeechJob, events: asyncio.Queue, clock: StageClock) -> None:
        """The talker's stream into the engine (frames) and `events` (text deltas and the upstream stages' times,
        then None at its end, or the error that ended it). A stream that ends without marking its last frames
        finished ends the speech there. When the talker's replica is lost, the talker is resumed from the reply's
        tokens passed on so far and the frames received (`deployments.resume`): it sends the frames after them."""
        text, received = job.thinker.resume.copy(), []  # the talker's frames [G, f] so far
        if job.frames is not None:  # resumed after a lost Code2Wav: its frames are decoded again, not made again
            received.append(job.frames)
            self.engine.push(job.request_id, job.frames)

        def talker_stream(_lost):
            frames = torch.cat(received, dim=1) if received else None  # [G, F]
            return relayed(self.talker.options(stream=True).speak.remote(resumed(job, text, frames),
                                                                         consumer=self.actor))

        try:
            async for event in resuming("talker", job.request_id, talker_stream, self.settings):
                if isinstance(event, (TextDelta, StageTimes)):
                    if isinstance(event, TextDelta):
                        text.take(event)
                    events.put_nowait(event)
                    continue
                assert isinstance(event, CodecFrames)
                clock.mark("first_frames")
                received.append(event.codes)
                self.engine.push(job.request_id, event.codes, event.finished)
                events.put_nowait(event.codes)  # for the ingress, with the next chunk
            self.engine.push(job.request_id, None, finished=True)
            events.put_nowait(None)
        except Exception as exc:
            events.put_nowait(exc)
