"""The talker deployment (with its code predictor): pulls the thinker's states, streams codec frames.

Two things run at once for a request: a reader that consumes the thinker's `TalkerInput`s (forwarding their text
and the thinker's times downstream at once and feeding the prompt and tokens into the `TalkerRequest`),
and the decode loop, which prefills as soon as the first reply token is in, each step then waiting only for the
reply token it consumes, and sends the frames ready as one message (all those the engine made since the last
send). Both put their events on one queue that this generator drains. The frames come from the replica's
`TalkerEngine` (replies decode together; one too long for a row of its batch runs there in a cache of its own).
When the thinker's replica is lost, the reader resumes it from the reply's text passed on so far
(`deployments.resume`); the resumed thinker gives the talker inputs from the first token again, and those the
`TalkerRequest` has are skipped. A job resumed with the frames of a lost talker (`SpeechJob.frames`) has the engine
feed them after the prompt and go on from the next.

A job with a session (`SpeechJob.session`) is routed to the replica that keeps the session's user turns
(`deployments.session_routing`, as the thinker's), whose engine prefills only what the reply's prompt adds
(`stages.talker_sessions`); `end_session` frees it.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

import torch
from ray import serve
from ray.actor import ActorHandle
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from common.checkpoint import THINKER_EMBEDDING
from common.messages import CodecFrames, TalkerPrompt, ThinkerTokens
from deployments.jobs import ReplySoFar, SpeechJob, TalkerInput, coalesced, resumed
from deployments.resume import Received, relayed, resuming
from deployments.runtime import STAGE_DEFAULTS, StageReplica, all_ready
from deployments.session_routing import SessionAffinityRouter
from deployments.settings import ServiceSettings
from deployments.timeline import StageClock
from stages.compile import compile_enabled
from stages.handoff import TalkerRequest
from stages.talker import Talker, speaker_codec_id, talker_sampling
from stages.talker_engine import TalkerEngine
from stages.thinker_sessions import SessionStore

logger = logging.getLogger("ray.serve")

_DONE = object()  # end of one producer's events


@serve.deployment(name="talker", request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
                  **STAGE_DEFAULTS)
class TalkerStage(StageReplica):
    stage_name = "talker"

    def __init__(self, settings: dict, thinker: DeploymentHandle):
        self._start(
            ServiceSettings.model_validate(settings), extra_prefixes=(THINKER_EMBEDDING,),
            load=lambda ckpt, cfg, dtype, device: Talker.from_pretrained(ckpt, cfg, dtype=dtype, device=device),
        )
        self.thinker = thinker
        self.replies_resumed = 0  # replies this replica took on from frames made before (a lost talker or Code2Wav)
        context = self.stage.config.talker_config.text_config.max_position_embeddings
        settings = self.settings
        sessions = SessionStore(settings.talker_kept_sessions, settings.talker_kept_session_tokens,
                                settings.talker_session_idle_s)
        self.engine = TalkerEngine(self.stage.module, self.stage.config, max_rows=settings.talker_batch_rows,
                                   max_len=min(settings.talker_batch_max_len, context),
                                   compiled=compile_enabled(settings.compile, self.stage.device, self.stage.dtype),
                                   sessions=sessions)

    async def speak(self, job: SpeechJob, consumer: ActorHandle | None = None):
        """Yields TextDelta and StageTimes (passed through from the thinker), CodecFrames ([Q, F]: the frames
        ready since the last ones), and last this stage's StageTimes. `consumer`: the replica reading them, watched
        (`deployments.resume`)."""
        resumed_after = "" if job.frames is None else f", resumed after {job.frames.shape[1]} frames"
        if job.frames is not None:
            self.replies_resumed += 1
        logger.info("talker: %s (voice %s%s)", job.request_id, job.speaker, resumed_after)
        with self.serving(job.request_id) as clock:
            async for event in self.while_consumer_lives(job.request_id, self._speak(job, clock), consumer):
                if isinstance(event, CodecFrames):
                    clock.mark("first_out")
                yield event
            yield self.finish_times(clock)

    async def end_session(self, session: str) -> None:
        """Free what this replica keeps of a session (its client closed it). Call it with `session=` as a keyword:
        the router sends it to the session's replica."""
        self.engine.end_session(session)

    def describe(self, session: str | None = None) -> dict:
        """`StageReplica.describe`, plus this replica's kept sessions (positions each) with the prompt positions of
        session replies, reused or all, and how many replies it took on from frames made before (a lost talker's or
        Code2Wav's). `session=`: ask the replica that session is routed to."""
        return {**super().describe(), "sessions": self.engine.sessions.summary(),
                "replies_resumed": self.replies_resumed}

    async def _speak(self, job: SpeechJob, clock: StageClock):
        events: asyncio.Queue = asyncio.Queue()
        reply = _Reply(self.stage.config, speaker_codec_id(self.stage.config.talker_config, job.speaker),
                       job.thinker.resume.copy())
        reader = asyncio.create_task(self._read_thinker(job, reply, events, clock))
        decoder = asyncio.create_task(self._decode(job, reply, events, clock))
        try:
            running = 2
            while running:
                for event in coalesced(await all_ready(events)):  # the text behind as one delta
                    if event is _DONE:
                        running -= 1
                    elif isinstance(event, BaseException):
                        raise event
                    else:
                        yield event
        finally:
            for task in (reader, decoder):
                task.cancel()

    async def _read_thinker(self, job: SpeechJob, reply: "_Reply", events: asyncio.Queue, clock: StageClock) -> None:
        """The thinker's stream into `reply` and `events`, resumed from the tokens known here when its replica is
        lost (`deployments.resume`)."""
        try:
            async for event in resuming("thinker", job.request_id, lambda _: self._thinker_stream(job, reply),
                                        self.settings):
                clock.mark("input")
                if isinstance(event, TalkerInput):
                    if event.prompt is not None and reply.request is None:  # a resumed thinker sends it again
                        reply.start(event.prompt, self.stage.device)
                    reply.push(event.tokens, self.stage.device)
                    self._notify_engine()
                    event = event.text
                    reply.text.take(event)
                events.put_nowait(event)  # the text, or the thinker's times
            reply.close()
            events.put_nowait(_DONE)
        except Exception as exc:  # a thinker error ends the request (the ingress reports it)
            reply.close()
            events.put_nowait(exc)

    def _thinker_stream(self, job: SpeechJob, reply: "_Reply"):
        reply.inputs.new_stream()  # every thinker stream gives the talker inputs from the reply's first token
        return relayed(self.thinker.options(stream=True).generate.remote(resumed(job.thinker, reply.text),
                                                                         consumer=self.actor))

    def _notify_engine(self) -> None:
        self.engine.notify()  # a reply in the batch may be able to take its next step

    async def _decode(self, job: SpeechJob, reply: "_Reply", events: asyncio.Queue, clock: StageClock) -> None:
        try:
            await reply.wait(lambda r: r.prefill_ready)
            clock.mark("prefill_ready")
            if not reply.request.has_voice:  # nothing to say (e.g. an empty reply)
                events.put_nowait(_DONE)
                return
            params = talker_sampling(self.stage.config.talker_config, job.sampling)
            groups = self.stage.config.talker_config.num_code_groups
            async with aclosing(self._steps(job, reply, params, clock)) as steps:
                async for ready in steps:  # one CodecFrames [Q, F] for all the frames ready
                    frames = [step.frames[0] for step in ready if step.frames[0] is not None]
                    reason = ready[-1].finish_reasons[0]
                    if frames:
                        clock.mark("first_frame")
                        clock.outputs += len(frames)
                    codes = torch.stack(frames, dim=1) if frames else torch.zeros(groups, 0, dtype=torch.long)  # [Q, F]
                    if frames or reason is not None:
                        events.put_nowait(CodecFrames(job.request_id, codes.cpu(), finished=reason is not None))
                    if reason is not None:
                        break
            events.put_nowait(_DONE)
        except Exception as exc:
            events.put_nowait(exc)

    def _steps(self, job: SpeechJob, reply: "_Reply", params, clock: StageClock):
        """The reply's steps from the replica's engine, in lists of those ready."""
        return self.engine_steps(job.request_id, lambda sink: self.engine.submit(
            job.request_id, reply.request, params, sink, session=job.session, resume_frames=job.frames), clock)


class _Reply:
    """The `TalkerRequest` the reader fills, and an event the decode loop waits on. Reader and decode loop are
    coroutines of one event loop, so checking and waiting cannot interleave with an update."""

    def __init__(self, config, speaker_id: int, text: ReplySoFar):
        self.config = config
        self.speaker_id = speaker_id
        self.request: TalkerRequest | None = None
        self.text = text  # the reply's text passed on downstream, to resume the thinker from
        self.inputs = Received()  # the reply tokens' talker inputs in `request`, across the thinker's streams
        self.closed = False  # the thinker's stream ended (normally or not)
        self.changed = asyncio.Event()

    def start(self, prompt: TalkerPrompt, device: torch.device) -> None:
        self.request = TalkerRequest(self.config, _to(prompt, device), self.speaker_id)

    def push(self, tokens: ThinkerTokens, device: torch.device) -> None:
        """The thinker's next talker inputs; those `request` has already (a resumed thinker's stream gives them from
        the first token again) are skipped."""
        had = self.inputs.new_part(len(tokens.token_ids))
        if self.request.finished or (had == len(tokens.token_ids) and not tokens.finished):
            return
        embeds = tokens.token_embeds[had:].to(device)  # [n, H]
        self.request.push(ThinkerTokens(tokens.request_id, tokens.token_ids[had:], embeds, tokens.finished,
                                        tokens.finish_reason))
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def wait(self, ready) -> None:
        """Until `ready(request)`."""
        while self.request is None or not ready(self.request):
            if self.closed:
                raise RuntimeError("the thinker's stream ended before the talker had the input it needs")
            self.changed.clear()
            await self.changed.wait()


def _to(prompt: TalkerPrompt, device: torch.device) -> TalkerPrompt:
    for name in ("prompt_ids", "prompt_embeds", "prompt_accept_hidden"):
        setattr(prompt, name, getattr(prompt, name).to(device))
    return prompt
