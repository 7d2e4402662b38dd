"""Replies that survive a lost stage replica: the consumer of each stage's stream resumes it, on another replica or
on the one Serve starts in its place, from what it had already received.

Every hop of a reply knows what it has been sent: the reply's tokens (each `TextDelta` carries its ids), and below
them the codec frames or the PCM samples. When the replica streaming to it is lost (`replica_lost`), the consumer
calls the stage again with the job resumed from the tokens it has (`jobs.resumed`), skips what the new stream gives
it a second time, and goes on:
- a thinker lost: its consumer (the ingress for text, the talker for speech) resumes it from the tokens received.
  The new thinker prefills the prompt and those tokens (`ThinkerEngine.submit(resume_tokens=)`) and sends the text
  of the tokens after them only; to a talker it also sends the talker inputs of every token from the first (the
  talker asking may be a new one that has none of them), and a talker that has them skips those.
- a talker lost: Code2Wav resumes it from the tokens it has passed on and the frames it has (`SpeechJob.frames`);
  the new talker resumes the thinker from those tokens, feeds the frames after its prompt
  (`TalkerEngine.submit(resume_frames=)`) and sends the frames after them only.
- Code2Wav lost: the ingress resumes it from the tokens it has and the frames the lost one passed on with its
  chunks (`PcmChunk.codes`); the new Code2Wav decodes those frames again (the ingress skips the samples it has sent)
  and resumes the talker from them, as for a lost talker, so only the frames after them are made.
Why a greedy or seeded reply ends exactly as undisturbed: a resumed thinker gives the tokens that follow the resumed
ones in the undisturbed reply (`ThinkerEngine._resume`); a resumed talker feeds the frames it is given as the lost
one's decode steps fed them (teacher-forced), with its generator moved past their draws, so the state after them,
and the frames it goes on with, are the undisturbed reply's (`TalkerEngine._resume`); and the Code2Wav engine gives
a reply the samples `decode_chunked` gives its frames from the first, so the samples a new Code2Wav makes again
from the frames it is given are those already sent.

What a live replica raises (a bad request, a full queue) comes back wrapped in Ray's `RayTaskError` and is never
retried, and neither is a lost replica further up the chain (its own consumer resumes it). A consumer resumes a
reply at most `stage_retries` times, after `retry_backoff_s` (doubling each time): Serve's router holds the new call
until the stage has a running replica again. After that the reply ends with `StageUnavailableError`: a 503, or the
stream's error event once it has begun.

The other way round, a producer whose consumer died (the thinker streaming to a killed talker, the talker to a killed
Code2Wav) must stop by itself: Ray does not end a streaming call when its caller dies, and Serve's own cancellation
comes from a live caller only. So each consumer names its replica's actor in the call (`this_replica()`), and the
producer asks it every `consumer_check_s` whether it is alive (`while_consumer_lives`, a Ray actor's built-in ready
call, answered at once by a live replica and refused by Ray for a dead one; one call for all the replies a consumer
reads from the replica); once it is dead, the producer's stream is closed where it waits, which cancels the reply in
its engine (its rows free) and, through `relayed`, the stream it reads itself (the thinker's of a talker whose
Code2Wav died).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from common.errors import OmniError
from deployments.settings import ServiceSettings

logger = logging.getLogger("ray.serve")

# the replica serving a call is gone: its actor died (ActorDiedError) or cannot be reached (ActorUnavailableError),
# both RayActorErrors, or Serve's router found the replica it picked gone
LOST_REPLICA_ERRORS = (RayActorError, ReplicaUnavailableError)


class StageUnavailableError(OmniError):
    """A stage's replicas were lost more often during one reply than the service resumes it (`stage_retries`)."""

    status_code = 503
    error_type = "server_error"


class EncoderLostError(OmniError):
    """An encoder replica was lost before the thinker had its output: the ingress, which holds the encoders' inputs
    until the reply's first event, runs them again, whole (an encoder call is idempotent)."""

    status_code = 503
    error_type = "server_error"


class ConsumerLostError(OmniError):
    """The replica reading a stage's stream died: the stage ends the reply (no one reads the error)."""


def replica_lost(exc: BaseException) -> bool:
    """Whether `exc` says that the replica streaming to this process is gone, rather than that it (or a stage it
    called) raised an error, which Ray wraps in a `RayTaskError`."""
    return isinstance(exc, LOST_REPLICA_ERRORS) and not isinstance(exc, RayTaskError)


async def resuming(stage: str, request_id: str, call: Callable[[BaseException | None], AsyncIterator],
                   settings: ServiceSettings,
                   resumable: Callable[[BaseException], bool] = replica_lost) -> AsyncIterator:
    """The events of `call(None)`, a stage's stream; each time it ends with an error that is `resumable` (the
    replica streaming it was lost), `call(that error)` again (it builds the job from what its caller has received
    by then), `settings.stage_retries` times at most. A resumed call refused for a full queue (Serve's
    `BackPressureError`, here or further down the chain) is retried too: the reply was admitted, and a later
    arrival must not take its place."""
    losses, lost = 0, None
    while True:
        try:
            async for event in call(lost):
                yield event
            return
        except Exception as exc:
            if not (resumable(exc) or (lost is not None and isinstance(exc, BackPressureError))):
                raise
            losses, lost = losses + 1, exc
            if losses > settings.stage_retries:
                raise StageUnavailableError(
                    f"the {stage} stage lost its replica {losses} times during this reply; retry") from exc
            logger.warning("%s: the %s stream was lost (%s: %s); resuming it (%d of %d)", request_id, stage,
                           type(exc).__name__, str(exc).splitlines()[0], losses, settings.stage_retries)
            await asyncio.sleep(settings.retry_backoff_s * 2 ** (losses - 1))


class Received:
    """What a consumer has of one reply's stream, across the streams it resumes: its first `count` items (tokens,
    frames or samples), and the position in the stream now read, which gives every item from the first again."""

    def __init__(self, count: int = 0):
        self.count = count
        self.streamed = 0

    def new_stream(self) -> None:
        self.streamed = 0

    def new_part(self, n: int) -> int:
        """The next `n` items of the stream now read came in: how many of them, at their start, the consumer had
        already (it skips those)."""
        first = self.streamed
        self.streamed += n
        had = min(max(self.count - first, 0), n)
        self.count = max(self.count, self.streamed)
        return had


def this_replica() -> ActorHandle:
    """This replica's actor, for the stages it calls to watch (`while_consumer_lives`)."""
    return ray.get_runtime_context().current_actor


async def _until_dead(consumer: ActorHandle, every_s: float) -> None:
    """Returns once Ray says `consumer` is dead; asked every `every_s`. An actor Ray cannot reach for now
    (`ActorUnavailableError`) may come back, and so may Ray itself, so only `ActorDiedError` counts."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await consumer.__ray_ready__.remote()
        except ActorDiedError:
            return
        except RayError:
            continue


class _Watch:
    """One consumer replica watched for the streams of this event loop that it reads: one ping every `every_s`
    however many replies it reads from this replica. (A ping is an actor call, about 0.8 ms of the caller's CPU on a
    2-core machine: one per reply and second would take a tenth of a core at a hundred replies in flight.) Ends with
    its last stream."""

    def __init__(self, consumer: ActorHandle, every_s: float):
        self.dead = asyncio.ensure_future(_until_dead(consumer, every_s))
        self.streams = 0


_WATCHES: dict[tuple[int, str], _Watch] = {}  # (event loop, consumer actor id) → its watch


@contextlib.contextmanager
def _watching(consumer: ActorHandle, every_s: float):
    """The shared watch of `consumer` (`_Watch`), for one stream; its pings stop when no stream needs them."""
    key = (id(asyncio.get_running_loop()), consumer._actor_id.hex())
    watch = _WATCHES.get(key)
    if watch is None:
        watch = _WATCHES[key] = _Watch(consumer, every_s)
    watch.streams += 1
    try:
        yield watch.dead
    finally:
        watch.streams -= 1
        if watch.streams == 0:
            watch.dead.cancel()
            del _WATCHES[key]


async def while_consumer_lives(request_id: str, events: AsyncIterator, consumer: ActorHandle | None,
                               every_s: float) -> AsyncIterator:
    """The events of a stage's own stream while the replica reading it (`consumer`; None: not watched) is alive.
    Once it is dead, the stream is cancelled where it waits (its engine request cancelled, the streams it reads
    closed) and this ends with `ConsumerLostError`, which no one reads."""
    if consumer is None:
        async for event in events:
            yield event
        return
    step = None
    try:
        with _watching(consumer, every_s) as dead:
            while True:
                step = asyncio.ensure_future(anext(events))
                await asyncio.wait((step, dead), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    logger.warning("%s: the replica reading this reply died; cancelling it", request_id)
                    raise ConsumerLostError(f"{request_id}: the replica reading this reply died")
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                yield event
    finally:  # the consumer died, or this was cancelled or closed (by Serve, for a live consumer that went away)
        if step is not None and not step.done():
            step.cancel()  # the stream cancelled where it waits
            await asyncio.wait((step,))  # its cleanup has run: the engine freed the reply's rows
        await events.aclose()


async def relayed(stream) -> AsyncIterator:
    """The events of a stage's stream (a `DeploymentResponseGenerator`), the call cancelled at the stage when its
    reader stops before its end (it failed, was cancelled, or resumes the stream elsewhere): Serve does not end a
    call its caller merely stops reading."""
    finished = False
    try:
        async for event in stream:
            yield event
        finished = True
    finally:
        if not finished:
            stream.cancel()
