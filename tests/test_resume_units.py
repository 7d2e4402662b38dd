"""The parts of resuming a reply after a lost replica that need no running service: which errors are a lost replica,
the bounded retries and their give-up (a 503), what a consumer skips of a resumed stream, the thinker's text
resumed from the reply's first tokens, and the one watch a producer keeps of each consumer replica (the end to end
test with killed replicas is tests/test_resume.py)."""

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from common.errors import InvalidRequestError
from common.tokenizer import OmniTokenizer
from deployments.http_errors import error_for
from deployments.jobs import ReplySoFar, SpeechJob, TextDelta, ThinkerJob, resumed
from deployments.resume import Received, StageUnavailableError, replica_lost, resuming
from deployments.settings import ServiceSettings
from deployments.stop_strings import ReplyText

SETTINGS = ServiceSettings(stage_retries=2, retry_backoff_s=0)


def _raised_in_a_replica(cause: Exception) -> Exception:
    """`cause` as a stage's caller gets it when the stage raised it (Ray keeps its class)."""
    return RayTaskError("generate", "traceback", cause).as_instanceof_cause()


def test_only_a_lost_replica_is_resumed():
    assert replica_lost(ActorDiedError()) and replica_lost(ActorUnavailableError("unreachable", None))
    for raised in (InvalidRequestError("bad"), BackPressureError(num_queued_requests=1, max_queued_requests=1),
                   _raised_in_a_replica(InvalidRequestError("bad")),
                   _raised_in_a_replica(ActorDiedError())):  # lost further up the chain: resumed there
        assert not replica_lost(raised), raised


class Stage:
    """A stage's stream that is lost after `lost_after` events on each of its first `losses` calls."""

    def __init__(self, losses: int, lost_after: int = 1, error: Exception | None = None):
        self.losses, self.lost_after, self.error = losses, lost_after, error or ActorDiedError()
        self.calls = 0

    async def stream(self, lost):
        self.calls += 1
        for event in range(3):
            if self.calls <= self.losses and event == self.lost_after:
                raise self.error
            yield event


async def _events(stage: Stage) -> list:
    return [event async for event in resuming("thinker", "r", stage.stream, SETTINGS)]


def test_a_lost_stream_is_called_again_up_to_the_bound():
    stage = Stage(losses=2)
    assert asyncio.run(_events(stage)) == [0, 0, 0, 1, 2] and stage.calls == 3  # each call from the first event


def test_beyond_the_bound_the_reply_ends_with_a_503():
    stage = Stage(losses=3)
    with pytest.raises(StageUnavailableError) as info:
        asyncio.run(_events(stage))
    assert stage.calls == 3
    status, body = error_for(info.value)
    assert status == 503 and body["error"]["code"] == "stage_unavailable"


def test_a_bad_request_fails_at_once():
    stage = Stage(losses=1, error=_raised_in_a_replica(InvalidRequestError("bad", param="messages")))
    with pytest.raises(InvalidRequestError):
        asyncio.run(_events(stage))
    assert stage.calls == 1


def test_a_resumed_call_refused_for_a_full_queue_is_retried_but_a_first_call_is_not():
    """The first call's refusal is the client's 429; once admitted, a reply resumed into a full stage waits its turn
    (within the bound)."""
    full = BackPressureError(num_queued_requests=1, max_queued_requests=1)

    class Refused(Stage):
        async def stream(self, lost):
            self.calls += 1
            if self.calls == 1:
                yield 0
                raise ActorDiedError()
            if self.calls == 2:
                raise _raised_in_a_replica(full)  # refused further down the chain
            for event in range(3):
                yield event

    stage = Refused(losses=0)
    assert asyncio.run(_events(stage)) == [0, 0, 1, 2] and stage.calls == 3
    with pytest.raises(BackPressureError):
        asyncio.run(_events(Stage(losses=1, lost_after=0, error=full)))


def test_a_consumer_skips_what_a_resumed_stream_gives_again():
    """Frames (or samples) 0..4 received, then the stream is resumed and gives them from the first again."""
    frames = Received()
    assert [frames.new_part(n) for n in (2, 3)] == [0, 0]
    frames.new_stream()
    assert [frames.new_part(n) for n in (1, 3, 2, 4)] == [1, 3, 1, 0] and frames.count == 10


def test_a_resumed_job_carries_the_text_so_far_and_leaves_the_original_alone():
    job = SpeechJob(ThinkerJob("r", {}, None), "ethan", None)
    text = ReplySoFar()
    text.take(TextDelta("r", "Hi", [5, 6], 3))
    again = resumed(job, text)
    text.take(TextDelta("r", "!", [7], 3, finish_reason="length"))
    assert again.thinker.resume == ReplySoFar([5, 6]) and job.thinker.resume == ReplySoFar()
    assert resumed(job, text).thinker.resume == ReplySoFar([5, 6, 7], "length")


def test_the_text_resumed_after_any_token_is_the_rest_of_the_undisturbed_text(tiny_ckpt):
    """Characters split across tokens and text held back for a stop sequence: the text sent before the replica was
    lost plus the resumed replica's text is the undisturbed text, whichever token the loss came after."""
    tokenizer = OmniTokenizer.from_pretrained(tiny_ckpt)
    ids = tokenizer.encode("Grüße, 你好! The end is near. END here")
    stops = ["end is", "END"]

    def texts(tokens, reply):  # the text of each token, up to the one where a stop sequence ends the reply
        out = []
        for token in tokens:
            _, text, _, hit = reply.add(token, None)
            out.append(text)
            if hit:
                break
        return out

    undisturbed = texts(ids, ReplyText(tokenizer, stops, ()))
    assert "".join(undisturbed) == "Grüße, 你好! The "  # held back, then cut at the stop sequence
    for k in range(len(undisturbed)):  # a reply resumed after its stop sequence had ended (resume.finish_reason)
        reply = ReplyText(tokenizer, stops, ())
        reply.replay(ids[:k])
        assert "".join(undisturbed[:k]) + "".join(texts(ids[k:], reply)) == "".join(undisturbed), k


class Consumer:
    """A consumer replica's handle as the watch uses it: its actor id and the ready call, counted; once `dies`, Ray's
    answer for a dead actor."""

    class _Id:
        def hex(self) -> str:
            return "consumer-1"

    def __init__(self):
        self._actor_id, self.pings, self.dead = self._Id(), 0, False
        self.__ray_ready__ = self

    def remote(self):
        self.pings += 1
        future = asyncio.get_running_loop().create_future()
        if self.dead:
            future.set_exception(ActorDiedError())
        else:
            future.set_result(True)
        return future


def test_the_streams_a_consumer_reads_share_one_watch_of_it():
    """Three replies streamed to one consumer replica ping it once per period between them, not three times; when it
    dies, every one of them ends with `ConsumerLostError`; and the pings stop with the streams."""
    from deployments import resume

    async def stream():
        yield "first"
        await asyncio.Event().wait()  # a reply whose next step is far off

    async def one(consumer, every_s: float):
        watched = resume.while_consumer_lives("r", stream(), consumer, every_s)
        assert await anext(watched) == "first"
        with pytest.raises(resume.ConsumerLostError):
            await anext(watched)

    async def main():
        consumer = Consumer()
        replies = [asyncio.ensure_future(one(consumer, 0.02)) for _ in range(3)]
        await asyncio.sleep(0.2)  # about 10 periods
        alive_pings = consumer.pings
        consumer.dead = True
        await asyncio.wait_for(asyncio.gather(*replies), timeout=5)
        ended = consumer.pings
        await asyncio.sleep(0.1)
        return alive_pings, ended, consumer.pings

    alive_pings, ended, later = asyncio.run(main())
    assert 3 <= alive_pings <= 12, alive_pings  # one watch: ~10 pings, where three would make ~30
    assert later == ended and not resume._WATCHES
