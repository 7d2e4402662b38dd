"""Replies that survive a lost stage replica, end to end: a local Ray Serve, the real `openai` client, and replica
actors killed through Ray (`ray.kill`) in the middle of greedy streaming replies.

A spoken reply loses its talker, then its thinker, then its Code2Wav replica; a text reply loses its thinker. Each
stream pauses while Serve starts the replacement and then goes on: no error event, and its text and PCM equal those
of the same request undisturbed, byte for byte. `/health` names each stage while it has no replica running. A
reply whose thinker is lost again after it was resumed, past `stage_retries`, is a 503 with OpenAI's error body.

The other way round, a stage whose consumer was killed (the thinker under a talker, the talker under a Code2Wav)
while the client also went away, so nothing resumes the reply: it notices, and its engine lets the reply go long
before the reply's end.
"""

from __future__ import annotations

import base64
import threading
import time

import openai
import pytest
import requests

from serving import START_TIMEOUT_S, one_app

pytestmark = pytest.mark.slow

APP = "resume"
# long enough for the thinker to be generating when it is killed after the talker's resume (its text outlasts the
# talker's replacement), greedy on both stages
SPOKEN = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 300,
          "modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16"},
          "extra_body": {"temperature": 0, "talker_temperature": 0, "ignore_eos": True, "talker_max_tokens": 80}}
TEXT = {"messages": [{"role": "user", "content": "Count to three, please."}], "max_tokens": 400,
        "extra_body": {"temperature": 0, "ignore_eos": True}}
DRAIN_S = 120  # the bound on waiting for every engine to be empty after the replies
# a spoken reply whose whole run takes minutes here (thinker tokens up to the tiny model's context, as many frames)
LONG = {**SPOKEN, "max_tokens": 3000, "extra_body": {**SPOKEN["extra_body"], "talker_max_tokens": 3000}}
ORPHAN_S = 30  # the bound on a producer whose consumer died letting the reply go


@pytest.fixture(scope="module")
def service(serve_instance, tiny_ckpt):
    # one resume per stage and reply: every reply below loses each stage once, but the 503's loses its thinker twice
    settings = {"model": str(tiny_ckpt), "served_model_name": "omniray-tiny", "torch_threads": 1,
                "retry_backoff_s": 0.2, "consumer_check_s": 0.2, "stage_retries": 1}
    with one_app(settings, APP):
        yield serve_instance["url"]


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service + "/v1", api_key="unused", max_retries=0, timeout=300)


class Reply:
    """A streamed reply as the client gets it: text, PCM16 bytes, the finish reason."""

    def __init__(self):
        self.text, self.pcm, self.finish = "", b"", None

    def take(self, chunk) -> None:
        delta = chunk.choices[0].delta
        self.text += delta.content or ""
        if getattr(delta, "audio", None) is not None and delta.audio.data:
            self.pcm += base64.b64decode(delta.audio.data)
        self.finish = chunk.choices[0].finish_reason or self.finish


def _stream(client: openai.OpenAI, body: dict, on_chunk=None) -> Reply:
    """The whole reply; an error event in the stream raises `openai.APIError` (the test fails)."""
    reply = Reply()
    for chunk in client.chat.completions.create(model="omniray-tiny", stream=True, **body):
        if chunk.choices:
            reply.take(chunk)
            if on_chunk is not None:
                on_chunk(chunk, reply)
    assert reply.finish is not None, "the stream ended without a finish reason"
    return reply


def _stage(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, APP)


def _serving(stage: str, request_id: str | None = None) -> str:
    """Until the stage serves the request, or (None) its one request, whose id it returns (bounded; a stage whose
    replica is being replaced answers once the new one runs)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ids := _stage(stage).describe.remote().result(timeout_s=START_TIMEOUT_S)["in_flight"]) or \
            (request_id is not None and request_id not in ids):
        assert time.monotonic() < deadline, f"the {stage} never served {request_id or 'a request'}"
        time.sleep(0.05)
    if request_id is None:
        (request_id,) = ids
    return request_id


def _replica(stage: str) -> str | None:
    """The name of the stage's replica actor (one per stage here), None while it has none."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#{stage}#")]
    return names[0] if names else None


def _kill(stage: str) -> str:
    import ray

    name = _replica(stage)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def _replaced(stage: str, killed: str) -> None:
    """Until a replica other than `killed` runs for the stage (bounded)."""
    from ray import serve

    deadline = time.monotonic() + START_TIMEOUT_S
    while _replica(stage) in (None, killed) or \
            serve.status().applications[APP].deployments[stage].replica_states.get("RUNNING", 0) == 0:
        assert time.monotonic() < deadline, f"no new {stage} replica"
        time.sleep(0.1)


class HealthWatch:
    """Polls /health in a thread while a reply runs: the stages it named as down or degraded."""

    def __init__(self, url: str):
        self.url, self.named, self.stop = url, set(), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(0.25):
            body = requests.get(self.url + "/health", timeout=60).json()
            self.named |= set(body.get("stages_down", [])) | set(body.get("stages_degraded", []))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=120)


def _engines_drain() -> None:
    """Every stage's engine empty again (nothing left running for a reply whose consumer was lost), bounded."""
    deadline = time.monotonic() + DRAIN_S
    for stage in ("thinker", "talker", "code2wav"):
        while (held := _stage(stage).describe.remote().result(timeout_s=60))["batch"]:
            assert time.monotonic() < deadline, (stage, held)
            time.sleep(0.5)


def test_a_spoken_reply_survives_losing_its_talker_thinker_and_code2wav(service, client):
    """Killed in turn while the reply streams: the talker once audio has come, the thinker once the new talker has
    resumed it, Code2Wav once a new thinker runs. The client's stream only pauses."""
    undisturbed = _stream(client, SPOKEN)
    assert undisturbed.pcm and undisturbed.text

    kills = []  # (stage, the replica killed)

    def disturb(chunk, reply: Reply) -> None:
        """Each kill on an audio chunk after the one before, once the stage it replaced runs again."""
        if not reply.pcm or len(kills) == 3:
            return
        if not kills:
            stage = "talker"
        elif len(kills) == 1:
            stage = "thinker"
            _serving("talker", chunk.id)  # the new talker, which resumes the thinker at once
        else:
            stage = "code2wav"
            _replaced("thinker", kills[-1][1])
        _serving(stage, chunk.id)
        kills.append((stage, _kill(stage)))

    with HealthWatch(service) as health:
        disturbed = _stream(client, SPOKEN, disturb)
    assert [stage for stage, _ in kills] == ["talker", "thinker", "code2wav"], kills
    assert disturbed.text == undisturbed.text and disturbed.finish == undisturbed.finish
    assert len(disturbed.pcm) == len(undisturbed.pcm) and disturbed.pcm == undisturbed.pcm
    assert {"talker", "thinker", "code2wav"} <= health.named, health.named
    # the new talker resumed the reply twice from frames made before: for the talker it replaced, then for the new
    # Code2Wav (from the frames the lost one had passed on), not making the speech again from its first frame
    assert _stage("talker").describe.remote().result(timeout_s=60)["replies_resumed"] == 2
    _engines_drain()


def test_a_text_reply_survives_losing_its_thinker(service, client):
    undisturbed = _stream(client, TEXT)
    killed = []

    def disturb(chunk, reply: Reply) -> None:
        if not killed and reply.text:
            killed.append(len(reply.text))
            _serving("thinker", chunk.id)
            _kill("thinker")

    disturbed = _stream(client, TEXT, disturb)
    assert killed and killed[0] < len(disturbed.text)
    assert disturbed.text == undisturbed.text and disturbed.finish == undisturbed.finish == "length"
    _engines_drain()


def test_a_reply_whose_stage_is_lost_more_often_than_it_is_resumed_is_a_503(service, client):
    """A whole text reply (nothing sent before its end) loses its thinker, is resumed on the replacement, and loses
    that one too: past `stage_retries` (1), the client gets a 503 with OpenAI's error body, not a hang or a 500, and
    the service answers the next request."""
    import concurrent.futures

    long_text = {**TEXT, "max_tokens": 3000}  # up to the tiny model's context: it outlasts a replica's restart
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(client.chat.completions.create, model="omniray-tiny", **long_text)
        request_id = _serving("thinker")
        killed = _kill("thinker")
        _replaced("thinker", killed)
        _serving("thinker", request_id)  # resumed on the new replica
        killed = _kill("thinker")
        with pytest.raises(openai.APIStatusError) as refused:
            reply.result(timeout=START_TIMEOUT_S)
    assert refused.value.status_code == 503, refused.value
    error = refused.value.body
    assert (error["type"], error["code"]) == ("server_error", "stage_unavailable"), error
    assert "the thinker stage lost its replica 2 times" in error["message"], error
    _replaced("thinker", killed)
    assert _stream(client, TEXT).finish == "length"
    _engines_drain()


def test_an_encoder_lost_before_its_output_is_told_apart_from_its_errors(service):
    """The thinker awaits the encoders' outputs by reference: an encoder actor that dies before its output is ready
    becomes `EncoderLostError` (the ingress then runs the encoders again, whole), an error it raised stays itself."""
    import asyncio
    import os

    import ray

    from common.errors import InvalidRequestError
    from deployments.resume import EncoderLostError
    from deployments.thinker import _encoded

    @ray.remote(num_cpus=0)
    class Encoder:
        def dies(self):
            os._exit(1)

        def refuses(self):
            raise InvalidRequestError("unreadable audio")

    encoder = Encoder.remote()
    with pytest.raises(InvalidRequestError):
        asyncio.run(_encoded(encoder.refuses.remote()))
    with pytest.raises(EncoderLostError):
        asyncio.run(_encoded(encoder.dies.remote()))


@pytest.mark.parametrize("consumer, producers", [("talker", ["thinker"]), ("code2wav", ["talker", "thinker"])])
def test_a_stage_whose_consumer_died_lets_the_reply_go(service, client, consumer, producers):
    """The consumer's replica is killed mid-reply and the client goes away at once, so no one resumes the reply: the
    stage that streamed to the dead replica cancels the reply in its engine (and the talker its thinker stream),
    though its reply had minutes to run."""
    stream = client.chat.completions.create(model="omniray-tiny", stream=True, **LONG)
    request_id = None
    for chunk in stream:
        if chunk.choices and getattr(chunk.choices[0].delta, "audio", None) is not None:
            request_id = chunk.id
            break
    assert request_id is not None, "the stream ended before any audio"
    for stage in (consumer, *producers):
        _serving(stage, request_id)
    killed = _kill(consumer)
    stream.close()
    deadline = time.monotonic() + ORPHAN_S
    for stage in producers:
        while request_id in (held := _stage(stage).describe.remote().result(timeout_s=60))["batch"]:
            assert time.monotonic() < deadline, f"the {stage} still decodes a reply nobody reads: {held}"
            time.sleep(0.2)
    _replaced(consumer, killed)  # for the tests after this one


def test_a_watched_stream_is_cleaned_up_when_cancelled_and_when_its_consumer_dies(serve_instance):
    """`while_consumer_lives` over a stream that waits after its first event: cancelled from outside (Serve does so
    for a live caller that went away), or once its consumer actor is killed (it then raises `ConsumerLostError`),
    the stream's own cleanup has run (the stages cancel their engine request there)."""
    import asyncio

    import ray

    from deployments.resume import ConsumerLostError, while_consumer_lives

    @ray.remote(num_cpus=0)
    class Consumer:
        pass

    async def stream(cleaned: list):
        try:
            yield "first"
            await asyncio.Event().wait()  # a reply whose next step is far off
        finally:
            cleaned.append(True)

    async def cancelled_while_waiting(consumer) -> list:
        cleaned = []
        watched = while_consumer_lives("r", stream(cleaned), consumer, every_s=0.05)
        assert await anext(watched) == "first"
        waiting = asyncio.ensure_future(anext(watched))
        await asyncio.sleep(0.2)
        waiting.cancel()
        await asyncio.wait((waiting,))
        return cleaned

    async def consumer_killed(consumer) -> tuple[list, type]:
        cleaned = []
        watched = while_consumer_lives("r", stream(cleaned), consumer, every_s=0.05)
        assert await anext(watched) == "first"
        ray.kill(consumer, no_restart=True)
        with pytest.raises(ConsumerLostError):
            await asyncio.wait_for(anext(watched), timeout=START_TIMEOUT_S)
        return cleaned

    consumer = Consumer.remote()
    ray.get(consumer.__ray_ready__.remote())
    assert asyncio.run(cancelled_while_waiting(consumer)) == [True]
    assert asyncio.run(consumer_killed(consumer)) == [True]
