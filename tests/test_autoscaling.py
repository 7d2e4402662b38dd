"""Autoscaling under load: `serve_config.autoscale.yaml` on a local Ray Serve (the tiny checkpoint), driven through
the real `openai` client.

Sustained spoken load makes Serve add a thinker and a talker replica, and both replicas of each take requests;
when the load drops, Serve removes the added replicas, and a replica removed while it streams a reply finishes it
(Serve's graceful shutdown waits for its ongoing requests). Every request of the test succeeds with the reply it
gets alone (greedy decoding). Which replica serves what: `StageReplica.describe()` through the stage's handle
("replica" is Serve's id, "served" the requests it has taken on, "in_flight" the ids of those it serves now).
"""

from __future__ import annotations

import asyncio
import base64
import time

import openai
import pytest
import yaml

from test_serve import ROOT, START_TIMEOUT_S, _free_port, _wait_running

pytestmark = pytest.mark.slow

CONFIG = ROOT / "serve_config.autoscale.yaml"
SCALED = ("thinker", "talker")
LOAD = 4  # spoken streams kept going at once: 2 per replica, above the target of 1 even on two replicas
PLACING = 12  # long replies sent, at most, until one streams from the added talker replica (4 missed once)
SCALE_TIMEOUT_S = 180  # for Serve to start or stop a replica on a busy two-core machine (a minute, seen)
# A spoken reply the load sends over and over (a second or two of work on two cores): a long text reply voiced only
# at its start, so the thinker streams for as long as the talker does and both stages see the same load. (A reply
# voiced to its end keeps the talker busy long after the thinker is done, and the thinker would not scale.)
SPOKEN = {"messages": [{"role": "user", "content": "Hello there, who are you?"}], "max_tokens": 150,
          "modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16"},
          "extra_body": {"temperature": 0, "talker_temperature": 0, "ignore_eos": True, "talker_max_tokens": 20}}
# a long one (tens of seconds), still under way when Serve removes the replica that serves it
LONG = {**SPOKEN, "max_tokens": 1000, "extra_body": {**SPOKEN["extra_body"], "talker_max_tokens": 1000}}


@pytest.fixture(scope="module")
def service(tiny_ckpt):
    """The config file as `omniray serve --config` deploys it, with the tests' checkpoint and a free port."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from deployments.serve_cli import wait_for_proxies

    raw = yaml.safe_load(CONFIG.read_text())
    port = _free_port()
    raw["http_options"]["port"] = port
    raw["applications"][0]["args"].update(model=str(tiny_ckpt), served_model_name="omniray-tiny")
    config = ServeDeploySchema.model_validate(raw)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        serve.start(proxy_location=config.proxy_location, http_options=config.http_options.model_dump())
        wait_for_proxies(START_TIMEOUT_S)
        _get_global_client().deploy_apps(config)
        _wait_running(["omniray"])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


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

    return dict(serve.status().applications["omniray"].deployments[stage].replica_states)


def _replicas(stage: str, asks: int = 6) -> dict[str, dict]:
    """`describe()` of each replica that answered, by replica id: the handle routes each call to one replica, and
    calls sent together go to both (each answer replaces the older one of its replica). Fewer than the stage's
    `max_queued_requests` (8), which also bounds this caller."""
    from ray import serve

    handle = serve.get_deployment_handle(stage, "omniray")
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


def test_load_adds_a_replica_that_takes_requests_and_removing_it_drains(service):
    async def main():
        client = _client(service)
        # one call each: six at once would count as six ongoing requests, enough to add a replica
        first = {stage: set(await asyncio.to_thread(_replicas, stage, 1)) for stage in SCALED}
        assert all(len(ids) == 1 for ids in first.values()), first
        spoken_alone, long_alone = (await _stream(client, SPOKEN))[1:], (await _stream(client, LONG))[1:]

        # sustained load: a second replica of each stage, and both take requests
        stop, replies = asyncio.Event(), []
        load = [asyncio.create_task(_load(client, stop, replies)) for _ in range(LOAD)]
        for stage in SCALED:
            await _until(lambda: _running(stage).get("RUNNING", 0) == 2, f"a second {stage} replica")
        served = {stage: await _until(lambda: _both_served(stage), f"both {stage} replicas to serve requests")
                  for stage in SCALED}
        added = {stage: (set(served[stage]) - first[stage]).pop() for stage in SCALED}

        # the load drops to one long reply, which the added talker replica serves: Serve removes that replica
        # while the reply streams from it
        long_reply = await _long_reply_on(client, "talker", added["talker"])
        stop.set()
        await asyncio.gather(*load)
        await _until(lambda: _running("talker").get("RUNNING", 0) == 1, "the talker to scale back down")
        removed_while_streaming = not long_reply.done()
        long_result = (await long_reply)[1:]
        for stage in SCALED:
            await _until(lambda: _running(stage) == {"RUNNING": 1}, f"the {stage} to be back at one replica")
        left = {stage: set(await asyncio.to_thread(_replicas, stage)) for stage in SCALED}
        return spoken_alone, long_alone, replies, first, served, removed_while_streaming, long_result, left

    spoken_alone, long_alone, replies, first, served, removed_while_streaming, long_result, left = asyncio.run(main())
    failed = [r for r in replies if isinstance(r, Exception)]
    assert not failed, f"{len(failed)} of {len(replies)} requests failed under load: {failed[:3]}"
    assert all(reply[1:] == spoken_alone for reply in replies), "a reply under load differs from the one alone"
    assert len(spoken_alone[1]) > 0 and len(long_alone[1]) > len(spoken_alone[1])
    for stage in SCALED:
        assert all(d["served"] > 0 for d in served[stage].values()), served[stage]
    # Serve removes its newest replica first: the one serving the long reply
    assert left["talker"] == first["talker"], "Serve removed the talker's first replica, not the one it added"
    assert removed_while_streaming, "the long reply ended before Serve removed its replica: nothing was drained"
    assert long_result == long_alone, "the reply of the removed replica differs from the one alone"


def _both_served(stage: str) -> dict[str, dict] | None:
    replicas = _replicas(stage)
    return replicas if len(replicas) == 2 and all(d["served"] > 0 for d in replicas.values()) else None


async def _long_reply_on(client: openai.AsyncOpenAI, stage: str, replica: str) -> asyncio.Task:
    """A LONG reply streaming from `replica` of `stage`: sent again (at most PLACING times) until the router puts
    one there (it picks the less loaded of the two, about every other time under the load); a client that went away
    ends each of the others (they would keep the stage's load up)."""
    for _ in range(PLACING):
        started = asyncio.get_running_loop().create_future()
        reply = asyncio.create_task(_stream(client, LONG, started))
        request_id = await asyncio.wait_for(started, timeout=60)
        holder = await _until(lambda: _holder(stage, request_id), f"the {stage} replica serving {request_id}")
        if holder == replica:
            return reply
        reply.cancel()
        await asyncio.gather(reply, return_exceptions=True)
    pytest.fail(f"the router sent none of {PLACING} long replies to the {stage} replica {replica}")


def _holder(stage: str, request_id: str) -> str | None:
    return next((rid for rid, d in _replicas(stage).items() if request_id in d["in_flight"]), None)
