"""Admission control end to end: a local Ray Serve whose thinker and talker take one batch row each (so each
replica serves 2 requests and 1 more may wait at each caller), loaded beyond that through the real `openai` client.

A request beyond a bound gets a 429 with `Retry-After` and OpenAI's rate-limit body as its HTTP status, streaming
or not, and also when the stage that refuses it is deep in the chain (the thinker, called by the talker); every
request that was admitted finishes with the reply it gets alone.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time

import openai
import pytest

from serving import one_app

pytestmark = pytest.mark.slow

APP = "admission"
RETRY_AFTER_S = 2
HOLD = {"messages": [{"role": "user", "content": "Count to three, please."}], "max_tokens": 300,
        "extra_body": {"temperature": 0, "ignore_eos": True}}  # a few seconds of thinker work
LONG_HOLD = {**HOLD, "max_tokens": 1000}  # the thinker busy while the test sends two more requests
SPOKEN = {"messages": [{"role": "user", "content": "Hello there, who are you?"}], "max_tokens": 8,
          "modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16"},
          "extra_body": {"temperature": 0, "talker_temperature": 0, "talker_max_tokens": 30}}


@pytest.fixture(scope="module")
def service(serve_instance, tiny_ckpt):
    settings = {"model": str(tiny_ckpt), "served_model_name": "omniray-tiny", "torch_threads": 1,
                "thinker_batch_rows": 1, "talker_batch_rows": 1, "retry_after_s": RETRY_AFTER_S}
    with one_app(settings, APP):
        yield serve_instance["url"]


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


async def _stream(client: openai.AsyncOpenAI, body: dict):
    """The reply's (text, PCM) after the whole stream, or the 429 that refused it."""
    try:
        stream = await client.chat.completions.create(model="omniray-tiny", stream=True, **body)
    except openai.RateLimitError as refused:
        return refused
    text, pcm, finish = "", b"", None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        if getattr(delta, "audio", None) is not None and delta.audio.data:
            pcm += base64.b64decode(delta.audio.data)
        finish = chunk.choices[0].finish_reason or finish
    assert finish is not None, "the stream ended without a finish reason"
    return text, pcm


def _assert_refused(refused: openai.RateLimitError) -> None:
    assert refused.status_code == 429 and refused.response.headers["retry-after"] == str(RETRY_AFTER_S)
    assert refused.body["code"] == "rate_limit_exceeded" and set(refused.body) == {"message", "type", "param", "code"}


@functools.cache
def _handle(stage: str):
    from ray import serve

    return serve.get_deployment_handle(stage, APP)


def _in_flight(stage: str) -> list[str]:
    return _handle(stage).describe.remote().result()["in_flight"]


def test_a_burst_beyond_the_bound_gets_429s_and_the_admitted_replies_are_whole(service):
    """8 streaming text requests at once for a thinker that serves 2 and queues 1."""

    async def main():
        client = _client(service)
        alone = await _stream(client, HOLD)
        burst = await asyncio.gather(*(_stream(client, HOLD) for _ in range(8)))
        return alone, burst

    alone, burst = asyncio.run(main())
    refused = [r for r in burst if isinstance(r, openai.RateLimitError)]
    replies = [r for r in burst if not isinstance(r, openai.RateLimitError)]
    assert refused and replies, burst
    for r in refused:
        _assert_refused(r)
    assert all(reply == alone for reply in replies)


def test_a_spoken_request_refused_deep_in_the_chain_gets_a_429_status(service):
    """The thinker busy with 2 text replies and one spoken request waiting for it at the talker: the next spoken
    request is admitted by Code2Wav and the talker, refused by the thinker, and its client gets a 429 as the status
    of its stream. The replies admitted before it, waiting one included, finish as they would alone."""

    async def main():
        for stage in ("thinker", "talker"):  # the handles' routers started before the test needs them
            await asyncio.to_thread(_in_flight, stage)
        client = _client(service)
        spoken_alone, hold_alone = await _stream(client, SPOKEN), await _stream(client, LONG_HOLD)
        # one after the other: two calls in the same instant may both count as queued
        holds = [asyncio.create_task(_stream(client, LONG_HOLD))]
        await _until(lambda: len(_in_flight("thinker")) == 1)
        holds.append(asyncio.create_task(_stream(client, LONG_HOLD)))
        await asyncio.sleep(0.5)  # in the thinker's last place now (`describe` needs a place too, so it cannot tell)
        waiting = asyncio.create_task(_stream(client, SPOKEN))
        await _until(lambda: len(_in_flight("talker")) == 1)
        await asyncio.sleep(0.5)  # its thinker call waits in the talker's router now
        refused = await _stream(client, SPOKEN)
        assert not any(hold.done() for hold in holds), "the thinker's replies ended before the test could load it"
        return spoken_alone, hold_alone, refused, await waiting, await asyncio.gather(*holds)

    spoken_alone, hold_alone, refused, waiting, holds = asyncio.run(main())
    assert isinstance(refused, openai.RateLimitError), refused
    _assert_refused(refused)
    assert waiting == spoken_alone and len(spoken_alone[1]) > 0
    assert holds == [hold_alone, hold_alone]
    for stage in ("thinker", "talker", "code2wav"):
        assert _in_flight(stage) == [], stage


async def _until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
