"""Autoscaling under load: `serve_config.autoscale.yaml` on a local Ray Serve (the tiny checkpoint), driven through
the real `openai` client.

Sustained spoken load makes Serve add a thinker and a talker replica, and both replicas of each take requests;
when the load drops, Serve removes the added replicas. Every request of the test succeeds with the reply it gets
alone (greedy decoding).

Then a long reply is left on the replica Serve added (Serve removes its newest replica first; two long replies are
sent at once, one lands on each replica, the other is closed) and the load drops to it alone: Serve removes that
replica while the reply streams from it, the replica drains (its graceful shutdown waits for its replies), and the
reply ends whole, equal to the same reply alone.

Which replica serves what: `StageReplica.describe()` through the stage's handle ("replica" is Serve's id, "served"
the requests it has taken on, "in_flight" the ids of those it serves now).
"""

from __future__ import annotations

import asyncio
import base64
import time

import openai
import pytest
import yaml

from serving import ROOT, applications

pytestmark = pytest.mark.slow

CONFIG = ROOT / "serve_config.autoscale.yaml"
APP = "autoscale"
SCALED = ("thinker", "talker")
LOAD = 4  # spoken streams kept going at once: 2 per replica, above the target of 1 even on two replicas
SCALE_TIMEOUT_S = 180  # for Serve to start or stop a replica on a busy two-core machine (a minute, seen)
# A spoken reply the load sends over and over (a second or two of work on two cores): a long text reply voiced only
# at its start, so the thinker streams for as long as the talker does and both stages see the same load. (A reply
# voiced to its end keeps the talker busy long after the thinker is done, and the thinker would not scale.)
SPOKEN = {"messages": [{"role": "user", "content": "Hello there, who are you?"}], "max_tokens": 150,
          "modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16"},
          "extra_body": {"temperature": 0, "talker_temperature": 0, "ignore_eos": True, "talker_max_tokens": 20}}
# The reply left on a replica Serve removes: its text streams through the talker for ~15 s, longer than the scale-down
# takes to start (downscale_delay_s and the look-back of the config)
DRAINED = {**SPOKEN, "max_tokens": 2048}


@pytest.fixture(scope="module")
def service(serve_instance, tiny_ckpt):
    """The config file's application as `omniray serve --config` deploys it, with the tests' checkpoint, on the
    session's Serve (one node, so one proxy, as the config's `HeadOnly`)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    (app,) = raw["applications"]
    app["args"].update(model=str(tiny_ckpt), served_model_name="omniray-tiny", max_tokens_limit=DRAINED["max_tokens"])
    app["name"] = APP
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    with applications([APP]):
        yield serve_instance["url"]


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


async def _stream(client: openai.AsyncOpenAI, body: dict, started: asyncio.Future | None = None):
    """The reply's (id, text, PCM) after the whole stream; its id goes to `started` with the first chunk."""
    request_id, text, pcm, finish = None, "", b"", None
    async with await client.chat.completions.create(model="omniray-tiny", stream=True, **body) as stream:
        async for chunk in stream:  # leaving the block (cancelled too) closes the connection
            if request_id is None and started is not None:
                started.set_result(chunk.id)
            request_id = chunk.id
            delta = chunk.choices[0].delta
            text += delta.content or ""
            if getattr(delta, "audio", None) is not None and delta.audio.data:
                pcm += base64.b64decode(delta.audio.data)
            finish = chunk.choices[0].finish_reason or finish
    assert finish is not None, "the stream ended without a finish reason"
    return request_id, text, pcm


def _running(stage: str) -> dict:
    """The stage's replicas by state (RUNNING, STARTING, STOPPING, ...), as Serve's controller reports them."""
    from ray import serve

    return dict(serve.status().applications[APP].deployments[stage].replica_states)


def _replicas(stage: str, asks: int = 6) -> dict[str, dict]:
    """`describe()` of each replica that answered, by replica id: the handle routes each call to one replica, and
    calls sent together go to both (each answer replaces the older one of its replica). Fewer than the stage's
    `max_queued_requests` (8), which also bounds this caller."""
    from ray import serve

    handle = serve.get_deployment_handle(stage, APP)
    answers = [handle.describe.remote() for _ in range(asks)]
    return {d["replica"]: d for d in (a.result(timeout_s=60) for a in answers)}


async def _until(condition, what: str, timeout_s: float = SCALE_TIMEOUT_S):
    """Polls `condition` (run in a thread: it calls Serve) until it returns something truthy, which it returns."""
    deadline = time.monotonic() + timeout_s
    while not (value := await asyncio.to_thread(condition)):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.25)
    return value


async def _load(client: openai.AsyncOpenAI, stop: asyncio.Event, replies: list) -> None:
    """One client sending SPOKEN again and again until `stop`: each reply (or the error it got) into `replies`."""
    while not stop.is_set():
        try:
            replies.append(await _stream(client, SPOKEN))
        except Exception as error:  # kept for the assertion, which names it
            replies.append(error)


def test_load_adds_a_replica_that_takes_requests_and_scales_back_down_draining_a_reply(service):
    async def main():
        client = _client(service)
        # one call each: six at once would count as six ongoing requests, enough to add a replica
        first = {stage: set(await asyncio.to_thread(_replicas, stage, 1)) for stage in SCALED}
        assert all(len(ids) == 1 for ids in first.values()), first
        spoken_alone = (await _stream(client, SPOKEN))[1:]

        # sustained load: a second replica of each stage, and both take requests
        stop, replies = asyncio.Event(), []
        load = [asyncio.create_task(_load(client, stop, replies)) for _ in range(LOAD)]
        for stage in SCALED:
            await _until(lambda: _running(stage).get("RUNNING", 0) == 2, f"a second {stage} replica")
        served = {stage: await _until(lambda: _both_served(stage), f"both {stage} replicas to serve requests")
                  for stage in SCALED}

        # the load stops but for one long reply on the talker Serve added: Serve removes the replicas it added, the
        # talker's while the reply streams from it. The reply is placed while the load still runs: once it stops,
        # Serve may stop routing to the added replica before a new request reaches it.
        drained, added = await _a_reply_on_the_added_talker(client, first["talker"])
        stop.set()
        await asyncio.gather(*load)
        stopping = await _until(lambda: drained.done() or _running("talker").get("STOPPING", 0),
                                "Serve to start removing the added talker replica")
        removed_mid_reply = stopping is not True and not drained.done()
        drained_reply = await drained
        for stage in SCALED:
            await _until(lambda: _running(stage) == {"RUNNING": 1}, f"the {stage} to be back at one replica")
        left = {stage: set(await asyncio.to_thread(_replicas, stage)) for stage in SCALED}
        drained_alone = (await _stream(client, DRAINED))[1:]
        return spoken_alone, replies, first, served, left, (added, removed_mid_reply, drained_reply, drained_alone)

    spoken_alone, replies, first, served, left, drain = asyncio.run(main())
    failed = [r for r in replies if isinstance(r, Exception)]
    assert not failed, f"{len(failed)} of {len(replies)} requests failed under load: {failed[:3]}"
    assert all(reply[1:] == spoken_alone for reply in replies), "a reply under load differs from the one alone"
    assert len(spoken_alone[1]) > 0
    for stage in SCALED:
        assert all(d["served"] > 0 for d in served[stage].values()), served[stage]
    for stage in SCALED:  # Serve removes its newest replica first
        assert left[stage] == first[stage], f"Serve removed the {stage}'s first replica, not the one it added"
    added, removed_mid_reply, drained_reply, drained_alone = drain
    assert added not in left["talker"]
    assert removed_mid_reply, "the long reply ended before Serve removed its replica: make DRAINED longer"
    assert drained_reply[1:] == drained_alone and len(drained_alone[0]) > 0, "the drained reply differs from alone"


async def _a_reply_on_the_added_talker(client: openai.AsyncOpenAI, first: set[str]) -> tuple[asyncio.Task, str]:
    """A DRAINED reply streaming from the talker replica that is not in `first` (the one Serve added), and that
    replica's id. Two are sent at once, so that each replica takes one; the other one is closed."""
    for _ in range(5):
        started = [asyncio.get_running_loop().create_future() for _ in range(2)]
        replies = [asyncio.create_task(_stream(client, DRAINED, ready)) for ready in started]
        ids = [await ready for ready in started]
        replicas = await asyncio.to_thread(_replicas, "talker")
        added = {replica: d for replica, d in replicas.items() if replica not in first}
        on_added = [(reply, replica) for reply, request_id in zip(replies, ids)
                    for replica, d in added.items() if request_id in d["in_flight"]]
        kept = on_added[0] if on_added else (None, None)
        for reply in replies:
            if reply is not kept[0]:
                reply.cancel()
        await asyncio.gather(*(r for r in replies if r is not kept[0]), return_exceptions=True)
        if kept[0] is not None:
            return kept
    raise AssertionError("no long reply landed on the added talker replica in 5 tries")


def _both_served(stage: str) -> dict[str, dict] | None:
    replicas = _replicas(stage)
    return replicas if len(replicas) == 2 and all(d["served"] > 0 for d in replicas.values()) else None
