"""A session's turns through the thinker engine, reusing what the earlier turns left, against a fresh prefill of each
turn: the same greedy reply, token for token, the same talker messages and the same codec codes.

What is exact and what is not (float32, tiny checkpoint): ids, positions and input embeddings of the talker message
are the fresh prefill's bit for bit; the accept-layer states of the kept prefix come from earlier prefills over
fewer tokens, so they round differently (compared to 1e-5 here); greedy tokens and codes are identical.
"""

import threading
import time

import pytest
import torch

from common.sampling import SamplingParams
from stages.handoff import TalkerRequest, multimodal_mask
from stages.omni import thinker_prompt
from stages.talker import generate_codes, speaker_codec_id, talker_sampling
from stages.thinker_engine import ThinkerEngine
from stages.thinker_sessions import SessionStore
from test_thinker import chirp, image


@pytest.fixture
def engines():
    made = []

    def make(model, sessions=None, **kwargs):
        layer = model.cfg.talker_config.accept_hidden_layer
        kwargs = {"max_rows": 2, "max_len": 1024, **kwargs}
        made.append(ThinkerEngine(model.thinker, accept_hidden_layer=layer, sessions=sessions, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def store(**bounds):
    return SessionStore(**{"max_sessions": 8, "max_tokens": 100_000, "idle_s": 600.0, **bounds})


# user turns: (text, images, audios); media of one turn stay the same in every later prompt
TURNS = [
    ("Hello, what do you hear?", [], [chirp(1.3, 500, 900)]),
    ("And in this picture?", [image(64, 64, seed=1)], []),
    ("Say it again, shorter.", [], []),
    ("One more sound.", [], [chirp(0.8)]),
]

# a turn whose reply (tiny checkpoint, greedy) starts with no media placeholder: a generated placeholder ran as a
# plain token, so the kept state ends before it
STORY = ("Tell me a story.", [], [])


class Conversation:
    """The turns so far as the chat template renders them, with each assistant reply's decoded text."""

    def __init__(self, model, proc):
        self.model, self.proc = model, proc
        self.messages = [{"role": "system", "content": [{"type": "text", "text": "You are Qwen."}]}]
        self.images, self.audio = [], []

    def user(self, text, images, audios):
        content = [{"type": "image"} for _ in images] + [{"type": "audio"} for _ in audios]
        self.messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        self.images += images
        self.audio += audios

    def assistant(self, token_ids):
        text = self.model.tokenizer.decode(token_ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})

    def prompt(self, audio=None):
        text = self.proc.apply_chat_template(self.messages, add_generation_prompt=True)
        kwargs = {}
        if self.images:
            kwargs["images"] = self.images
        if audio or self.audio:
            kwargs["audio"] = audio or self.audio
        inputs = self.proc([text], **kwargs)
        return thinker_prompt(inputs, self.model.audio_encoder, self.model.vision_encoder, False)


def run(engine, request_id, prompt, params, speaking=True, session=None, stop_after=None, resume_tokens=()):
    """A request's steps, to its end (or cancelled after `stop_after` steps: from the engine thread, so its row is
    freed before the next step)."""
    steps, done = [], threading.Event()

    def on_step(step):
        steps.append(step)
        if len(steps) == stop_after:
            engine.cancel(request_id)
        if isinstance(step, BaseException) or step.finish_reasons[0] is not None or len(steps) == stop_after:
            done.set()

    engine.submit(request_id, prompt, params, speaking, on_step, session=session, resume_tokens=resume_tokens)
    assert done.wait(120), request_id
    assert not any(isinstance(s, BaseException) for s in steps), steps
    return steps


def tokens(steps):
    return [s.token_ids[0] for s in steps]


def codes(model, steps):
    """The talker's greedy codec codes for a reply (at most 6 frames)."""
    cfg = model.cfg
    request = TalkerRequest(cfg, steps[0].talker_prompts[0], speaker_codec_id(cfg.talker_config, "ethan"))
    for step in steps:
        request.push(step.talker_tokens[0])
    params = talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=6))
    return generate_codes(model.talker, cfg, [request], [params])[0]


def test_turns_reusing_the_session_equal_fresh_prefills(tiny_omni, engines):
    """Four turns (audio, then an image, text, audio again), spoken: each turn's reply, talker message and codec codes
    equal a fresh prefill's, and every turn after the first prefills only what follows the previous turn."""
    model, proc, cfg = tiny_omni
    session_engine, fresh_engine = engines(model, store()), engines(model)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(cfg.im_end_token_id,))
    talk = Conversation(model, proc)
    previous_prompt = 0
    for turn, user in enumerate(TURNS):
        talk.user(*user)
        prompt = talk.prompt()
        ours = run(session_engine, f"s{turn}", prompt, params, session="chat")
        fresh = run(fresh_engine, f"f{turn}", prompt, params)
        assert tokens(ours) == tokens(fresh), turn
        cached = ours[0].cached_tokens
        assert fresh[0].cached_tokens == 0 and all(s.cached_tokens == 0 for s in ours[1:])
        if turn == 0:
            assert cached == 0
        else:  # at least the whole previous prompt, at most all but the last token
            assert previous_prompt <= cached < prompt.input_ids.shape[1], (turn, cached)
        ours_prompt, fresh_prompt = ours[0].talker_prompts[0], fresh[0].talker_prompts[0]
        assert torch.equal(ours_prompt.prompt_ids, fresh_prompt.prompt_ids)
        assert torch.equal(ours_prompt.prompt_embeds, fresh_prompt.prompt_embeds)
        media = int(multimodal_mask(cfg.thinker_config, fresh_prompt.prompt_ids).sum())
        hidden = cfg.thinker_config.text_config.hidden_size
        assert ours_prompt.prompt_accept_hidden.shape == fresh_prompt.prompt_accept_hidden.shape == (media, hidden)
        torch.testing.assert_close(ours_prompt.prompt_accept_hidden, fresh_prompt.prompt_accept_hidden,
                                   rtol=0, atol=1e-5)
        for a, b in zip(ours, fresh):
            assert torch.equal(a.talker_tokens[0].token_embeds, b.talker_tokens[0].token_embeds)
        assert torch.equal(codes(model, ours), codes(model, fresh)), turn
        previous_prompt = prompt.input_ids.shape[1]
        talk.assistant(tokens(ours)[:-1] if ours[-1].finish_reasons[0] == "stop" else tokens(ours))
    summary = session_engine.sessions.summary()
    assert list(summary["kept"]) == ["chat"] and summary["reused_tokens"] > 0


def test_different_media_in_the_kept_prefix_are_not_reused(tiny_omni, engines):
    """Turn 2 whose first turn's audio is another sound of the same length (same ids, same positions): the kept
    state is reused only up to that audio's first token, and the reply is a fresh prefill's."""
    model, proc, cfg = tiny_omni
    engine, fresh_engine = engines(model, store()), engines(model)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(cfg.im_end_token_id,))
    talk = Conversation(model, proc)
    talk.user(*TURNS[0])
    first = run(engine, "t1", talk.prompt(), params, session="chat")
    talk.assistant(tokens(first)[:-1])
    talk.user(*TURNS[2])
    other_sound = [chirp(1.3, 900, 1500)]
    prompt = talk.prompt(audio=other_sound)
    ours, fresh = run(engine, "t2", prompt, params, session="chat"), run(fresh_engine, "f2", prompt, params)
    ids = prompt.input_ids[0]
    first_audio = int(torch.nonzero(ids == cfg.thinker_config.audio_token_id)[0])
    assert ours[0].cached_tokens == first_audio
    assert tokens(ours) == tokens(fresh)
    assert torch.equal(codes(model, ours), codes(model, fresh))


def test_a_cancelled_reply_is_kept_up_to_where_it_stopped(tiny_omni, engines):
    """Barge-in: the reply is cancelled after 4 tokens; the next turn's prompt holds that cut reply, and reuses the
    kept state through the first turn's prompt at least."""
    model, proc, cfg = tiny_omni
    engine, fresh_engine = engines(model, store()), engines(model)
    params = SamplingParams(max_new_tokens=30, min_new_tokens=30)
    talk = Conversation(model, proc)
    talk.user(*STORY)
    first_prompt = talk.prompt()
    cut = run(engine, "t1", first_prompt, params, session="chat", stop_after=4)
    for _ in range(100):  # the engine frees (and keeps) the row at its next step
        if engine.sessions.summary()["kept"]:
            break
        time.sleep(0.05)
    assert engine.sessions.summary()["kept"]["chat"] == first_prompt.input_ids.shape[1] + 3
    talk.assistant(tokens(cut))
    talk.user(*TURNS[0])
    prompt = talk.prompt()
    short = SamplingParams(max_new_tokens=8, stop_token_ids=(cfg.im_end_token_id,))
    ours, fresh = run(engine, "t2", prompt, short, session="chat"), run(fresh_engine, "f2", prompt, short)
    assert ours[0].cached_tokens >= first_prompt.input_ids.shape[1]
    assert tokens(ours) == tokens(fresh)


def test_sessions_are_bounded_ended_and_expire(tiny_omni, engines):
    """The least recently used session goes beyond the count and the token bounds; `end_session` drops one; an
    idle one expires. A turn of a dropped session is a fresh prefill with the same reply."""
    model, proc, cfg = tiny_omni
    now = [0.0]
    sessions = store(max_sessions=2, max_tokens=10_000, idle_s=100.0, clock=lambda: now[0])
    engine = engines(model, sessions)
    params = SamplingParams(max_new_tokens=4, min_new_tokens=4)
    talk = Conversation(model, proc)
    talk.user(*STORY)
    prompt = talk.prompt()
    length = prompt.input_ids.shape[1] + 3
    replies = {}
    for name in ("a", "b", "c"):
        now[0] += 1
        replies[name] = tokens(run(engine, name, prompt, params, speaking=False, session=name))
    assert sessions.summary()["kept"] == {"b": length, "c": length}  # a, least recent, went
    again = run(engine, "a2", prompt, params, speaking=False, session="a")
    assert again[0].cached_tokens == 0 and tokens(again) == replies["a"]
    assert list(sessions.summary()["kept"]) == ["c", "a"]

    sessions.max_tokens = 2 * length - 1  # two no longer fit
    now[0] += 1
    run(engine, "b2", prompt, params, speaking=False, session="b")
    assert list(sessions.summary()["kept"]) == ["b"]

    engine.end_session("b")
    run(engine, "d", prompt, params, speaking=False, session="d")  # the engine has ended b before admitting d
    assert list(sessions.summary()["kept"]) == ["d"]

    now[0] += 100
    assert sessions.expire() is None and sessions.summary()["kept"] == {}
    with pytest.raises(ValueError, match="keeps no sessions"):
        engines(model).submit("x", prompt, params, False, lambda step: None, session="x")


def test_a_resumed_turn_reuses_the_session_and_keeps_what_the_undisturbed_turn_keeps(tiny_omni, engines):
    """A session's turn resumed from its first tokens (its thinker replica was lost, and the session routed to a
    replica that keeps it): its prompt reuses the kept state, the rest of its reply is the undisturbed one's, and it
    keeps what the undisturbed turn keeps."""
    model, proc, cfg = tiny_omni
    resuming, undisturbed = engines(model, store()), engines(model, store())
    params = SamplingParams(max_new_tokens=10, min_new_tokens=10)
    talk = Conversation(model, proc)
    talk.user(*STORY)
    first_prompt = talk.prompt()
    first = run(resuming, "r1", first_prompt, params, session="chat")
    assert tokens(run(undisturbed, "u1", first_prompt, params, session="chat")) == tokens(first)
    talk.assistant(tokens(first))
    talk.user("Go on.", [], [])  # a reply with no media placeholder (tiny checkpoint, greedy): all of it is kept
    prompt = talk.prompt()
    whole = run(undisturbed, "u2", prompt, params, session="chat")
    resumed = run(resuming, "r2", prompt, params, session="chat", resume_tokens=tokens(whole)[:4])
    assert tokens(resumed) == tokens(whole)[4:]
    assert first_prompt.input_ids.shape[1] <= resumed[0].cached_tokens < prompt.input_ids.shape[1]
    for _ in range(100):  # each kept when its row is freed, on its engine's thread
        kept = [engine.sessions.summary()["kept"].get("chat") for engine in (resuming, undisturbed)]
        if kept[0] == kept[1]:
            break
        time.sleep(0.05)
    assert kept[0] == kept[1] == prompt.input_ids.shape[1] + 10 - 1, kept  # the last token is sampled, not fed
