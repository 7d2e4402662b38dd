"""A session's spoken replies through the talker engine, reusing the user part its earlier replies left, against
`generate_codes` (the reference loop, a fresh prefill) on each reply: the same greedy codec codes, frame for frame.

The replies come from a thinker engine that keeps the session too (as the service runs them), so an earlier clip's
accept-layer states are the same bits turn after turn and the whole user part of the reply before is reused.
"""

import threading

import pytest
import torch

from common.sampling import SamplingParams
from stages.handoff import TalkerRequest
from stages.talker import generate_codes, speaker_codec_id, talker_sampling
from stages.talker_engine import TalkerEngine
from stages.thinker_engine import ThinkerEngine
from test_thinker import chirp
from test_thinker_sessions import TURNS, Conversation, run, store, tokens


@pytest.fixture
def engines():
    """(a thinker engine keeping sessions, a talker engine keeping sessions: or not, `talker_sessions=None`)."""
    made = []

    def make(model, talker_sessions):
        layer = model.cfg.talker_config.accept_hidden_layer
        made.append(ThinkerEngine(model.thinker, accept_hidden_layer=layer, sessions=store(), max_rows=2,
                                  max_len=1024))
        made.append(TalkerEngine(model.talker, model.cfg, max_rows=2, max_len=1024, sessions=talker_sessions))
        return made[-2], made[-1]

    yield make
    for engine in made:
        engine.close()


def talker_request(model, steps) -> TalkerRequest:
    cfg = model.cfg
    request = TalkerRequest(cfg, steps[0].talker_prompts[0], speaker_codec_id(cfg.talker_config, "ethan"))
    for step in steps:
        request.push(step.talker_tokens[0])
    return request


PARAMS = SamplingParams(max_new_tokens=8)


def speak(engine, model, request_id, steps, session=None) -> torch.Tensor:
    """The reply's codes [G, F] from the talker engine."""
    frames, done, failed = [], threading.Event(), []

    def on_frame(step):
        if isinstance(step, BaseException):
            failed.append(step)
        elif step.frames[0] is not None:
            frames.append(step.frames[0])
        if isinstance(step, BaseException) or step.finish_reasons[0] is not None:
            done.set()

    params = talker_sampling(model.cfg.talker_config, PARAMS)
    engine.submit(request_id, talker_request(model, steps), params, on_frame, session=session)
    assert done.wait(120) and not failed, (request_id, failed)
    return torch.stack(frames, dim=1)


def fresh_codes(model, steps) -> torch.Tensor:
    params = talker_sampling(model.cfg.talker_config, PARAMS)
    return generate_codes(model.talker, model.cfg, [talker_request(model, steps)], [params])[0]


def reply_steps(thinker, model, talk, turn):
    cfg = model.cfg
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(cfg.im_end_token_id,))
    steps = run(thinker, f"t{turn}", talk.prompt(), params, session="chat")
    talk.assistant(tokens(steps)[:-1] if steps[-1].finish_reasons[0] == "stop" else tokens(steps))
    return steps


def test_replies_reusing_the_session_equal_fresh_prefills(tiny_omni, engines):
    """Four spoken turns (audio, an image, text, audio again): each reply's codes equal a fresh prefill's, and every
    reply after the first reuses the whole user part of the one before."""
    model, proc, cfg = tiny_omni
    sessions = store()
    thinker, talker = engines(model, sessions)
    talk = Conversation(model, proc)
    previous_user, reused_before = 0, 0
    for turn, user in enumerate(TURNS):
        talk.user(*user)
        steps = reply_steps(thinker, model, talk, turn)
        assert torch.equal(speak(talker, model, f"s{turn}", steps, session="chat"), fresh_codes(model, steps)), turn
        reused = sessions.summary()["reused_tokens"] - reused_before
        assert reused == previous_user, (turn, reused, previous_user)
        reused_before += reused
        previous_user = int(talker_request(model, steps).user_turns.sum())
    assert list(sessions.summary()["kept"]) == ["chat"]
    assert sessions.summary()["kept"]["chat"] == previous_user


def test_other_media_in_the_kept_prefix_end_the_reuse_and_a_session_ends(tiny_omni, engines):
    """Turn 2 whose first clip is another sound of the same length (same ids and positions, other accept-layer
    states): the reuse ends at that clip's first position, and the codes are a fresh prefill's. An ended session
    keeps nothing; an engine without a store refuses a session."""
    model, proc, cfg = tiny_omni
    sessions = store()
    thinker, talker = engines(model, sessions)
    talk = Conversation(model, proc)
    talk.user(*TURNS[0])
    first = reply_steps(thinker, model, talk, 0)
    speak(talker, model, "s0", first, session="chat")
    talk.user(*TURNS[2])
    talk.audio = [chirp(1.3, 900, 1500)]  # the first turn's clip, replaced by another of the same length
    second = reply_steps(thinker, model, talk, 1)
    assert torch.equal(speak(talker, model, "s1", second, session="chat"), fresh_codes(model, second))
    request = talker_request(model, second)
    user_ids = request.prompt.prompt_ids[request.user_turns]
    first_audio = int(torch.nonzero(user_ids == cfg.thinker_config.audio_token_id)[0])
    assert sessions.summary()["reused_tokens"] == first_audio > 0

    talker.end_session("chat")
    speak(talker, model, "s2", second)  # no session: the engine thread has ended "chat" before admitting it
    assert sessions.summary()["kept"] == {}
    no_store = engines(model, None)[1]
    with pytest.raises(ValueError, match="keeps no sessions"):
        no_store.submit("x", talker_request(model, second), talker_sampling(cfg.talker_config, PARAMS),
                        lambda step: None, session="x")
