"""The continuously batched talker engine against `generate_codes` on each reply alone: the same frames (greedy and
seeded), while replies join, leave, and wait for their thinker tokens to arrive."""

import threading
import time

import pytest
import torch

from common.sampling import SamplingParams
from stages.omni import OmniModel
from stages.handoff import TalkerRequest
from stages.talker import generate_codes, speaker_codec_id, talker_sampling
from stages.talker_engine import TalkerEngine
from stages.thinker import generate as thinker_generate

PROMPTS = ["The quick brown fox jumps.", "Hello there, who are you?", "Count to three, please.", "Sing a song.",
           "What is the weather like today?"]


@pytest.fixture(scope="module")
def setup(tiny_ckpt, hf_processor):
    """Per prompt: the thinker's reply (talker prompt and token chunks), as the talker stage receives them."""
    model = OmniModel.from_pretrained(tiny_ckpt, device="cpu")
    proc, cfg = hf_processor(tiny_ckpt), model.cfg
    replies = []
    for text in PROMPTS:
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        inputs = proc(text=[proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)],
                      return_tensors="pt")
        prompt = model._thinker_prompt(dict(inputs), use_audio_in_video=False)
        replies.append(thinker_generate(model.thinker, prompt, [SamplingParams(max_new_tokens=10)], speaking=[True],
                                        accept_hidden_layer=cfg.talker_config.accept_hidden_layer)[0])
    return model, replies


@pytest.fixture
def engines():
    """Makes engines; stops their threads after the test."""
    made = []

    def make(*args, **kwargs):
        made.append(TalkerEngine(*args, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()
        assert not engine.thread.is_alive()


def request(model, reply, voice="ethan", chunks=None):
    cfg = model.cfg
    r = TalkerRequest(cfg, reply.talker_prompt, speaker_codec_id(cfg.talker_config, voice))
    for chunk in reply.talker_chunks[:chunks]:
        r.push(chunk)
    return r


class Frames:
    def __init__(self):
        self.frames, self.reasons, self.done = {}, {}, {}

    def sink(self, request_id):
        self.frames[request_id], self.done[request_id] = [], threading.Event()

        def on_frame(step):
            if isinstance(step, BaseException):
                self.reasons[request_id] = step
                self.done[request_id].set()
                return
            if step.frames[0] is not None:
                self.frames[request_id].append(step.frames[0])
            if step.finish_reasons[0] is not None:
                self.reasons[request_id] = step.finish_reasons[0]
                self.done[request_id].set()
        return on_frame

    def codes(self, request_id, groups):
        frames = self.frames[request_id]
        return torch.stack(frames, dim=1) if frames else torch.zeros(groups, 0, dtype=torch.long)


def test_replies_equal_each_alone_while_joining_and_waiting_for_text(setup, engines):
    """Five replies on two rows, greedy (one with min_new_tokens) and seeded-sampled mixed, three of them fed their thinker tokens bit by bit
    (the talker waits for each): every reply's codes equal `generate_codes` on it alone."""
    model, replies = setup
    cfg, groups = model.cfg, model.cfg.talker_config.num_code_groups
    params = [talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=n, repetition_penalty=1.05))
              for n in (14, 9, 20, 6, 12)]
    params[1] = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=9, do_sample=True, temperature=0.9,
                                                                  top_k=20, top_p=0.8, seed=5))
    # a greedy reply whose codec EOS is held back until its last frame (min_new_tokens)
    params[3] = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=6, min_new_tokens=6,
                                                                  repetition_penalty=1.05))
    expected = [generate_codes(model.talker, cfg, [request(model, reply)], [p])[0]
                for reply, p in zip(replies, params)]

    engine = engines(model.talker, cfg, max_rows=2, max_len=256)
    got = Frames()
    streamed = {}
    for i, (reply, p) in enumerate(zip(replies, params)):
        partial = i % 2 == 0  # the thinker's tokens still arriving
        streamed[i] = request(model, reply, chunks=1 if partial else None)
        engine.submit(f"r{i}", streamed[i], p, got.sink(f"r{i}"))
    for step in range(1, 12):  # the thinker goes on, slower than the talker
        time.sleep(0.02)
        for i in (0, 2, 4):
            if step < len(replies[i].talker_chunks):
                streamed[i].push(replies[i].talker_chunks[step])
        engine.notify()
    for i, event in got.done.items():
        assert event.wait(120), i
    for i, want in enumerate(expected):
        assert torch.equal(got.codes(f"r{i}", groups), want), (i, got.codes(f"r{i}", groups)[0], want[0])
        assert got.reasons[f"r{i}"] in ("stop", "length")
    assert engine.active == []


def test_lockstep_replies_wait_for_each_other_and_equal_each_alone(setup, engines):
    """Replies submitted in lockstep: not admitted before all can prefill, and no frame fed back for one while
    another's next text entry is missing; their codes still equal `generate_codes` on each alone."""
    model, replies = setup
    cfg, groups = model.cfg, model.cfg.talker_config.num_code_groups
    params = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=12, repetition_penalty=1.05))
    expected = [generate_codes(model.talker, cfg, [request(model, reply)], [params])[0] for reply in replies[:3]]
    engine = engines(model.talker, cfg, max_rows=4, max_len=256)
    got = Frames()
    complete = request(model, replies[0])  # all its text there
    late = request(model, replies[1], chunks=1)  # its first token only: it can prefill, not feed its first frame
    not_yet = TalkerRequest(cfg, replies[2].talker_prompt, speaker_codec_id(cfg.talker_config, "ethan"))
    engine.submit_lockstep([(f"r{i}", r, params, got.sink(f"r{i}")) for i, r in enumerate((complete, late, not_yet))])
    time.sleep(0.3)
    assert engine.active == []  # r2 cannot prefill yet: none of the three is admitted
    for chunk in replies[2].talker_chunks:
        not_yet.push(chunk)
    engine.notify()
    time.sleep(0.5)
    assert engine.active == ["r0", "r1", "r2"]
    assert [len(got.frames[f"r{i}"]) for i in range(3)] == [1, 1, 1]  # held at their first frame by r1's text
    for chunk in replies[1].talker_chunks[1:]:
        late.push(chunk)
    engine.notify()
    for i, event in got.done.items():
        assert event.wait(120), i
    for i, want in enumerate(expected):
        assert torch.equal(got.codes(f"r{i}", groups), want), i


def test_replies_admitted_together_prefill_together_and_equal_each_alone(setup, engines, monkeypatch):
    """Five replies of prompts of different lengths, in two voices, admitted at once: their prompts prefill in one
    left-padded call, and each reply's codes equal `generate_codes` on it alone."""
    from stages.kv_cache import KVCache

    model, replies = setup
    cfg, groups = model.cfg, model.cfg.talker_config.num_code_groups
    params = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=10, repetition_penalty=1.05))
    voices = ["ethan", "chelsie", "ethan", "chelsie", "aiden"]
    expected = [generate_codes(model.talker, cfg, [request(model, reply, voice)], [params])[0]
                for reply, voice in zip(replies, voices)]
    assert len({reply.talker_prompt.prompt_ids.shape[0] for reply in replies}) > 1  # the batch has padding
    prefill_rows = []
    real_empty_like = KVCache.empty_like

    def counted(cache, batch_size, max_len):
        prefill_rows.append(batch_size)
        return real_empty_like(cache, batch_size, max_len)

    monkeypatch.setattr(KVCache, "empty_like", counted)
    engine = engines(model.talker, cfg, max_rows=5, max_len=256)
    got = Frames()
    engine.submit_lockstep([(f"r{i}", request(model, reply, voice), params, got.sink(f"r{i}"))
                            for i, (reply, voice) in enumerate(zip(replies, voices))])
    for i, event in got.done.items():
        assert event.wait(120), i
    assert prefill_rows == [5]
    for i, want in enumerate(expected):
        assert torch.equal(got.codes(f"r{i}", groups), want), i


def test_cancel_frees_the_row(setup, engines):
    model, replies = setup
    cfg = model.cfg
    engine = engines(model.talker, cfg, max_rows=1, max_len=512)
    got = Frames()
    long = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=400, min_new_tokens=400))
    engine.submit("long", request(model, replies[0]), long, got.sink("long"))
    short = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=5))
    engine.submit("next", request(model, replies[1]), short, got.sink("next"))
    deadline = time.monotonic() + 60
    while len(got.frames["long"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.cancel("long")
    assert got.done["next"].wait(60)
    assert torch.equal(got.codes("next", cfg.talker_config.num_code_groups),
                       generate_codes(model.talker, cfg, [request(model, replies[1])], [short])[0])
    assert len(got.frames["long"]) < 399 and not got.done["long"].is_set()


def test_an_empty_reply_ends_without_frames(setup, engines):
    """A reply with no token to voice (it ended at once) gets a finish and no frames."""
    model, replies = setup
    cfg = model.cfg
    from common.messages import ThinkerTokens

    empty = TalkerRequest(cfg, replies[0].talker_prompt, speaker_codec_id(cfg.talker_config, "ethan"))
    hidden = replies[0].talker_chunks[0].token_embeds
    empty.push(ThinkerTokens("e", [1], hidden, finished=True, finish_reason="stop"))
    engine = engines(model.talker, cfg, max_rows=1, max_len=256)
    got = Frames()
    engine.submit("e", empty, talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=5)), got.sink("e"))
    assert got.done["e"].wait(30) and got.frames["e"] == [] and got.reasons["e"] == "stop"


def test_a_reply_longer_than_a_row_runs_in_a_cache_of_its_own(setup, engines):
    """A reply that does not fit a row of the batch gets a one-row cache sized for it and runs the same loop, beside
    the batch: the same frames as alone."""
    model, replies = setup
    cfg = model.cfg
    engine = engines(model.talker, cfg, max_rows=1, max_len=40)
    long = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=30))
    short = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=3))
    assert not engine.fits(request(model, replies[0]), long) and engine.fits(request(model, replies[1]), short)
    got = Frames()
    engine.submit("long", request(model, replies[0]), long, got.sink("long"))
    engine.submit("short", request(model, replies[1]), short, got.sink("short"))
    assert got.done["long"].wait(60) and got.done["short"].wait(60)
    for name, reply, params in (("long", replies[0], long), ("short", replies[1], short)):
        expected = generate_codes(model.talker, cfg, [request(model, reply)], [params])[0]
        assert torch.equal(torch.stack(got.frames[name], dim=1), expected), name
    assert engine.active == []


def test_a_resumed_reply_goes_on_with_the_frames_of_the_undisturbed_one(setup, engines):
    """A reply resumed from its first F frames (made by a replica that was lost): the engine feeds them after its
    prompt and hands over only the frames after them, which are the undisturbed reply's, greedy and seeded, whichever
    frame it resumes after; half of them get their thinker tokens later than the known frames need (they wait)."""
    model, replies = setup
    cfg = model.cfg
    greedy = SamplingParams(max_new_tokens=16, min_new_tokens=16, repetition_penalty=1.05)
    seeded = SamplingParams(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=0.9, top_k=20,
                            top_p=0.8, seed=7)
    engine = engines(model.talker, cfg, max_rows=2, max_len=256)
    got, expected, partial = Frames(), {}, {}
    for kind, choice in (("greedy", greedy), ("seeded", seeded)):
        params = talker_sampling(cfg.talker_config, choice)
        whole = generate_codes(model.talker, cfg, [request(model, replies[0])], [params])[0]  # [G, N]
        assert whole.shape[1] == 15  # the 16th c0 ends the reply ("length"): no frame
        for known in (1, 7, 14):
            name = f"{kind}-{known}"
            expected[name] = whole[:, known:]
            late = known % 2 == 1
            r = request(model, replies[0], chunks=1 if late else None)
            if late:
                partial[name] = r
            engine.submit(name, r, params, got.sink(name), resume_frames=whole[:, :known])
    time.sleep(0.05)
    for r in partial.values():  # the rest of the thinker's tokens
        for chunk in replies[0].talker_chunks[1:]:
            r.push(chunk)
    engine.notify()
    for name, event in got.done.items():
        assert event.wait(120), name
    for name, want in expected.items():
        assert got.reasons[name] == "length", (name, got.reasons[name])
        assert torch.equal(got.codes(name, cfg.talker_config.num_code_groups), want), name
    assert engine.active == []
