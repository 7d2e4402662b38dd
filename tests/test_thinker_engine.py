"""The continuously batched thinker engine against `stream_generate` on each request alone: the same tokens (greedy
and seeded), the same talker messages, whatever joins or leaves the batch meanwhile."""

import asyncio
import queue
import threading
import time

import pytest
import torch
from test_thinker import BATCH, chirp, encoder_outputs, im_end, image, mixed_inputs

from common.config import load_config
from common.errors import InvalidRequestError
from common.sampling import SamplingParams
from stages.thinker import ThinkerLM, stream_generate
from stages.thinker_engine import ThinkerEngine

REQUESTS = BATCH + [
    ("Count to three, please.", [], []),
    ("Two pictures.", [image(64, 64, seed=1), image(48, 80, seed=2)], []),
    ("Long audio", [], [chirp(4.5)]),
]


@pytest.fixture(scope="module")
def setup(tiny_ckpt, hf_model, hf_processor):
    proc, hf = hf_processor(tiny_ckpt), hf_model(tiny_ckpt)
    prompts = [encoder_outputs(hf, mixed_inputs(proc, [item])) for item in REQUESTS]
    layer = load_config(tiny_ckpt).talker_config.accept_hidden_layer
    return ThinkerLM.from_pretrained(tiny_ckpt), prompts, im_end(proc), layer


@pytest.fixture
def engines():
    """Makes engines; stops their threads after the test."""
    made = []

    def make(*args, **kwargs):
        made.append(ThinkerEngine(*args, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()
        assert not engine.thread.is_alive()


class Collector:
    """Each request's steps as the engine hands them over (on its thread)."""

    def __init__(self):
        self.steps: dict[str, list] = {}
        self.done: dict[str, threading.Event] = {}

    def sink(self, request_id: str):
        self.steps[request_id], self.done[request_id] = [], threading.Event()

        def on_step(step):
            self.steps[request_id].append(step)
            if isinstance(step, BaseException) or step.finish_reasons[0] is not None:
                self.done[request_id].set()
        return on_step

    def wait(self, timeout=120):
        for request_id, event in self.done.items():
            assert event.wait(timeout), f"{request_id} did not finish"


def alone(model, prompt, params, speaking=False, layer=None, request_id="r"):
    return list(stream_generate(model, prompt, [params], request_ids=[request_id], speaking=[speaking],
                                accept_hidden_layer=layer))


def test_staggered_requests_equal_each_alone(setup, engines):
    """Six requests on three rows: some wait for a row, some join mid-way; greedy and seeded-sampled mixed; each
    gets exactly the tokens it gets alone."""
    model, prompts, eos, layer = setup
    params = [SamplingParams(max_new_tokens=n, min_new_tokens=n) for n in (60, 5, 9, 16, 7, 10)]  # exact lengths
    params[2] = SamplingParams(max_new_tokens=9, do_sample=True, temperature=1.2, top_k=8, top_p=0.9, seed=11,
                               stop_token_ids=(eos,))
    params[4] = SamplingParams(max_new_tokens=7, repetition_penalty=1.3, stop_token_ids=(eos,))
    engine = engines(model, max_rows=3, max_len=256, accept_hidden_layer=layer)
    got = Collector()
    batches = []  # the requests sharing the batch, seen at each step
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        sink = got.sink(f"r{i}")
        engine.submit(f"r{i}", prompt, p, False, lambda step, sink=sink: (batches.append(set(engine.active)),
                                                                         sink(step)))
        if i == 2:
            time.sleep(0.05)  # the first three are decoding when the rest arrive
    got.wait()
    assert max(map(len, batches)) == 3 and any({"r0", "r5"} <= b for b in batches)  # r5 joined r0 mid-way
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        expected = [s.token_ids[0] for s in alone(model, prompt, p)]
        assert [s.token_ids[0] for s in got.steps[f"r{i}"]] == expected, i
        assert got.steps[f"r{i}"][-1].finish_reasons[0] is not None
    assert engine.active == []


def test_talker_messages_equal_each_alone(setup, engines):
    model, prompts, eos, layer = setup
    engine = engines(model, max_rows=2, max_len=256, accept_hidden_layer=layer)
    got = Collector()
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(eos,))
    engine.submit("text", prompts[1], params, False, got.sink("text"))
    engine.submit("speak", prompts[0], params, True, got.sink("speak"))
    got.wait()
    expected = alone(model, prompts[0], params, speaking=True, layer=layer, request_id="speak")
    steps = got.steps["speak"]
    assert len(steps) == len(expected)
    first, want = steps[0].talker_prompts[0], expected[0].talker_prompts[0]
    assert first.request_id == "speak" and torch.equal(first.prompt_ids, want.prompt_ids)
    torch.testing.assert_close(first.prompt_accept_hidden, want.prompt_accept_hidden, rtol=0, atol=1e-6)
    assert torch.equal(first.image_grid_thw, want.image_grid_thw)
    assert all(s.talker_prompts is None for s in steps[1:])
    for step, ref in zip(steps, expected):
        ours_tokens, their_tokens = step.talker_tokens[0], ref.talker_tokens[0]
        assert ours_tokens.token_ids == their_tokens.token_ids and ours_tokens.finished == their_tokens.finished
        assert torch.equal(ours_tokens.token_embeds, their_tokens.token_embeds)
    assert all(s.talker_tokens is None and s.talker_prompts is None for s in got.steps["text"])


def test_requests_that_arrive_together_prefill_together_and_equal_each_alone(setup, engines, monkeypatch):
    """Six requests arrive while the engine is busy (text, an image with audio, two images, audio; two of them
    speak; one has an image feature too few): the five good ones prefill in one left-padded call, and each gets the
    tokens and talker messages it gets alone; the bad one ends alone, with its error."""
    import dataclasses

    from stages import thinker_engine

    model, prompts, eos, layer = setup
    batch_sizes = []
    real_prefill = thinker_engine.prefill

    def counted_prefill(model, prompt, *args, **kwargs):
        batch_sizes.append(prompt.input_ids.shape[0])
        return real_prefill(model, prompt, *args, **kwargs)

    monkeypatch.setattr(thinker_engine, "prefill", counted_prefill)
    engine = engines(model, max_rows=7, max_len=256, accept_hidden_layer=layer)
    got, holding, release = Collector(), threading.Event(), threading.Event()
    first = got.sink("first")
    engine.submit("first", prompts[1], SamplingParams(max_new_tokens=4, min_new_tokens=4), False,
                  lambda step: (holding.set(), release.wait(60), first(step)))  # holds the engine thread
    assert holding.wait(60)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(eos,))
    bad = dataclasses.replace(prompts[4], image_features=prompts[4].image_features[:-1])
    cases = {"image+audio": (prompts[0], True), "text": (prompts[3], False), "images": (prompts[4], True),
             "audio": (prompts[5], False), "bad": (bad, False), "audio2": (prompts[2], False)}
    for request_id, (prompt, speaking) in cases.items():
        engine.submit(request_id, prompt, params, speaking, got.sink(request_id))
    release.set()
    got.wait()
    assert batch_sizes == [1, 5]
    assert isinstance(got.steps["bad"][0], InvalidRequestError) and len(got.steps["bad"]) == 1
    for request_id, (prompt, speaking) in cases.items():
        if request_id == "bad":
            continue
        steps = got.steps[request_id]
        expected = alone(model, prompt, params, speaking=speaking, layer=layer, request_id=request_id)
        assert [s.token_ids[0] for s in steps] == [s.token_ids[0] for s in expected], request_id
        if speaking:
            ours, theirs = steps[0].talker_prompts[0], expected[0].talker_prompts[0]
            assert torch.equal(ours.prompt_ids, theirs.prompt_ids) and torch.equal(ours.image_grid_thw,
                                                                                   theirs.image_grid_thw)
            torch.testing.assert_close(ours.prompt_embeds, theirs.prompt_embeds, rtol=0, atol=0)
            torch.testing.assert_close(ours.prompt_accept_hidden, theirs.prompt_accept_hidden, rtol=0, atol=1e-5)
    assert engine.active == []


def test_cancel_frees_the_row_for_a_waiting_request(setup, engines):
    model, prompts, eos, layer = setup
    engine = engines(model, max_rows=1, max_len=512, accept_hidden_layer=layer)
    long, short = SamplingParams(max_new_tokens=400), SamplingParams(max_new_tokens=4, stop_token_ids=(eos,))
    steps: queue.Queue = queue.Queue()
    got = Collector()
    engine.submit("long", prompts[1], long, False, steps.put)
    engine.submit("queued", prompts[3], short, False, got.sink("queued"))
    engine.submit("cancelled while queued", prompts[2], short, False, got.sink("never"))
    engine.cancel("cancelled while queued")
    for _ in range(3):
        steps.get(timeout=60)
    engine.cancel("long")
    assert got.done["queued"].wait(60)  # the only row came free
    assert [s.token_ids[0] for s in got.steps["queued"]] == [s.token_ids[0] for s in alone(model, prompts[3], short)]
    time.sleep(0.2)
    assert got.steps["never"] == [] and engine.active == []
    assert steps.qsize() < 400 - 3  # the long one stopped early


def test_a_failing_request_ends_alone(setup, engines):
    """A prompt that cannot be prefilled (an image placeholder without features) gets its error; the engine goes
    on serving the others."""
    model, prompts, eos, layer = setup
    engine = engines(model, max_rows=2, max_len=256, accept_hidden_layer=layer)
    got = Collector()
    broken = prompts[0]
    broken = type(broken)(input_ids=broken.input_ids, attention_mask=broken.attention_mask)  # features dropped
    params = SamplingParams(max_new_tokens=5, stop_token_ids=(eos,))
    engine.submit("broken", broken, params, False, got.sink("broken"))
    engine.submit("fine", prompts[1], params, False, got.sink("fine"))
    got.wait()
    assert len(got.steps["broken"]) == 1 and isinstance(got.steps["broken"][0], Exception)
    assert [s.token_ids[0] for s in got.steps["fine"]] == [s.token_ids[0] for s in alone(model, prompts[1], params)]


def test_a_consumer_that_fails_takes_only_its_own_request_down(setup, engines):
    model, prompts, eos, layer = setup
    engine = engines(model, max_rows=2, max_len=256, accept_hidden_layer=layer)
    got = Collector()
    params = SamplingParams(max_new_tokens=30, min_new_tokens=30)

    def gone(step):
        raise RuntimeError("event loop is closed")

    engine.submit("gone", prompts[1], params, False, gone)
    engine.submit("fine", prompts[3], params, False, got.sink("fine"))
    got.wait()
    assert [s.token_ids[0] for s in got.steps["fine"]] == [s.token_ids[0] for s in alone(model, prompts[3], params)]
    assert engine.active == []


def test_a_request_longer_than_a_row_runs_in_a_cache_of_its_own(setup, engines):
    """A request that does not fit a row of the batch gets a one-row cache sized for it and runs the same loop,
    beside the batch: the same tokens and talker messages as alone."""
    model, prompts, eos, layer = setup
    engine = engines(model, max_rows=1, max_len=64, accept_hidden_layer=layer)
    long, short = SamplingParams(max_new_tokens=64), SamplingParams(max_new_tokens=6)
    assert not engine.fits(prompts[1], long) and engine.fits(prompts[2], short)
    got = Collector()
    engine.submit("long", prompts[1], long, True, got.sink("long"))
    engine.submit("short", prompts[2], short, False, got.sink("short"))
    got.wait()
    want_long = alone(model, prompts[1], long, speaking=True, layer=layer, request_id="long")
    assert [s.token_ids[0] for s in got.steps["long"]] == [s.token_ids[0] for s in want_long]
    for ours, theirs in zip(got.steps["long"], want_long):
        torch.testing.assert_close(ours.talker_tokens[0].token_embeds, theirs.talker_tokens[0].token_embeds,
                                   rtol=0, atol=0)
    assert [s.token_ids[0] for s in got.steps["short"]] == [s.token_ids[0] for s in alone(model, prompts[2], short)]
    assert engine.active == []


def test_a_replica_whose_engine_stopped_fails_its_health_check(setup, engines):
    """Serve replaces a replica whose `check_health` raises: one whose engine thread is gone would hang its
    requests."""
    from deployments.runtime import StageReplica

    model, prompts, eos, layer = setup
    replica = object.__new__(StageReplica)
    replica.stage_name, replica.engine = "thinker", engines(model, max_rows=1, max_len=64, accept_hidden_layer=layer)
    asyncio.run(replica.check_health())
    replica.engine.close()
    with pytest.raises(RuntimeError, match="engine's thread has stopped"):
        asyncio.run(replica.check_health())


@pytest.mark.parametrize("resumed", [1, 9])
def test_a_resumed_request_goes_on_as_the_undisturbed_reply(setup, engines, resumed):
    """A reply resumed from its first tokens (its replica was lost) gets exactly the steps that follow them in the
    undisturbed reply: greedy and seeded-sampled (its generator moved past their draws), after an image and audio
    in the prompt (positions after multimodal blocks), in the batch and in a cache of its own; a speaking one also
    gets, on its first step, the talker inputs of the resumed tokens, for a talker that has none of them."""
    model, prompts, eos, layer = setup
    greedy = SamplingParams(max_new_tokens=16, min_new_tokens=16, repetition_penalty=1.2)
    seeded = SamplingParams(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.2, top_k=8,
                            top_p=0.9, seed=11)
    cases = {"greedy": (prompts[0], greedy), "seeded": (prompts[2], seeded), "solo": (prompts[5], seeded)}
    row = max(prompts[0].input_ids.shape[1], prompts[2].input_ids.shape[1]) + 16
    engine = engines(model, max_rows=2, max_len=row, accept_hidden_layer=layer)
    assert not engine.fits(prompts[5], seeded)
    want = {name: alone(model, prompt, params, speaking=True, layer=layer, request_id=name)
            for name, (prompt, params) in cases.items()}
    got = Collector()
    for name, (prompt, params) in cases.items():
        head = [s.token_ids[0] for s in want[name][:resumed]]
        engine.submit(name, prompt, params, True, got.sink(name), resume_tokens=head)
    got.wait()
    for name, expected in want.items():
        steps = got.steps[name]
        assert [s.token_ids[0] for s in steps] == [s.token_ids[0] for s in expected[resumed:]], name
        first = steps[0].talker_tokens[0]
        assert first.token_ids == [s.token_ids[0] for s in expected[: resumed + 1]]
        assert torch.equal(first.token_embeds, torch.cat([s.talker_tokens[0].token_embeds
                                                          for s in expected[: resumed + 1]]))
        torch.testing.assert_close(steps[0].talker_prompts[0].prompt_accept_hidden,
                                   expected[0].talker_prompts[0].prompt_accept_hidden, rtol=0, atol=1e-6)
    assert engine.active == []


def test_resuming_from_a_whole_reply_is_refused(setup, engines):
    model, prompts, eos, layer = setup
    engine = engines(model, max_rows=1, max_len=256, accept_hidden_layer=layer)
    with pytest.raises(ValueError, match="none to generate"):
        engine.submit("r", prompts[1], SamplingParams(max_new_tokens=3), False, print, resume_tokens=[5, 6, 7])


def test_a_resumed_reply_that_had_ended_gets_its_talker_inputs_only(setup, engines):
    """A talker resumed below a reply whose text had ended needs the thinker's inputs of the whole reply: the engine
    prefills the prompt for the talker prompt and gives, in one step without a token, the talker inputs of the text's
    tokens (which hold no stop token: all voiced), as the undisturbed reply had them."""
    from stages.thinker_engine import ENDED

    model, prompts, eos, layer = setup
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(eos,))
    engine = engines(model, max_rows=1, max_len=256, accept_hidden_layer=layer)
    expected = alone(model, prompts[0], params, speaking=True, layer=layer, request_id="ended")
    text = [s.token_ids[0] for s in expected if s.token_ids[0] != eos]
    got = Collector()
    engine.submit("ended", prompts[0], params, True, got.sink("ended"), resume_tokens=text, ended=True)
    got.wait()
    [step] = got.steps["ended"]
    assert step.token_ids == [None] and step.finish_reasons == [ENDED]
    tokens = step.talker_tokens[0]
    assert tokens.token_ids == text and tokens.finished and tokens.finish_reason is None
    assert torch.equal(tokens.token_embeds, torch.cat([s.talker_tokens[0].token_embeds for s in expected])[:len(text)])
    torch.testing.assert_close(step.talker_prompts[0].prompt_accept_hidden,
                               expected[0].talker_prompts[0].prompt_accept_hidden, rtol=0, atol=1e-6)
    assert engine.active == []
