"""Talker and code predictor pieces: prompt segmentation, sampling setup, voices, the predictor's reused KV cache
vs recomputation, and streaming (thinker tokens pushed between steps) vs all text known up front.

End-to-end equality with transformers (codes, waveforms) is in test_omni.py.
"""

import numpy as np
import pytest
import torch

from common.config import load_config
from common.errors import UnknownVoiceError
from common.sampling import SamplingParams
from stages.code_predictor import GREEDY, FramePredictor, predict_residual_codes
from stages.omni import OmniModel
from stages.handoff import TalkerRequest, user_turn_mask
from stages.talker import generate_codes, speaker_codec_id, stream_frames, talker_sampling
from stages.sampling import sample_next, suppressed_mask
from stages.thinker import generate as thinker_generate


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return OmniModel.from_pretrained(tiny_ckpt, device="cpu")


def test_user_turns_are_kept_system_and_assistant_turns_dropped(tiny_ckpt):
    cfg = load_config(tiny_ckpt)
    s, u, a, nl, text = cfg.system_token_id, cfg.user_token_id, cfg.assistant_token_id, 198, 50
    start, end = cfg.im_start_token_id, cfg.im_end_token_id
    ids = torch.tensor([start, s, nl, text, end, nl,  # system turn
                        start, u, nl, text, text, end, nl,  # user turn
                        start, a, nl, text, end, nl,  # earlier assistant turn
                        start, u, nl, text, end, nl,  # user turn
                        start, a, nl])  # generation prompt
    keep = user_turn_mask(ids, cfg).tolist()
    expected = [False] * 6 + [True] * 7 + [False] * 6 + [True] * 6 + [False] * 3
    assert keep == expected


def test_codec_specials_are_suppressed_except_eos(tiny_ckpt):
    tcfg = load_config(tiny_ckpt).talker_config
    params = talker_sampling(tcfg, SamplingParams(max_new_tokens=7))
    vocab, eos = tcfg.text_config.vocab_size, tcfg.codec_eos_token_id
    banned = {t for a, b in params.suppress_ranges for t in range(a, b)}
    assert banned == set(range(vocab - 1024, vocab)) - {eos}
    assert params.stop_token_ids == (eos,) and params.max_new_tokens == 7


def test_speakers_are_case_insensitive_and_unknown_ones_listed(tiny_ckpt):
    tcfg = load_config(tiny_ckpt).talker_config
    assert speaker_codec_id(tcfg, "Chelsie") == speaker_codec_id(tcfg, "CHELSIE") == tcfg.speaker_id["chelsie"]
    with pytest.raises(UnknownVoiceError, match="aiden, chelsie, ethan") as err:
        speaker_codec_id(tcfg, "Bob")
    assert isinstance(err.value, ValueError) and err.value.status_code == 400


@torch.no_grad()
def test_greedy_frame_in_one_step_equals_the_per_code_steps_and_the_oracle(model):
    """`FramePredictor` runs an all-greedy frame as one step; the per-code steps (the path of sampled rows; top-k 1
    draws the argmax) and `predict_residual_codes` give the same codes and summed embeddings, bit for bit."""
    predictor = model.talker.code_predictor
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, predictor.cfg.hidden_size, generator=g)
    c0 = torch.randn(3, predictor.cfg.hidden_size, generator=g)
    frames = FramePredictor(predictor, 3, c0_head=model.talker.codec_head.weight,
                            c0_table=model.talker.model.codec_embedding.weight)
    top_1 = SamplingParams(do_sample=True, top_k=1)
    greedy_codes, greedy_sum = frames(hidden, c0, [GREEDY] * 3, [None] * 3)
    step_codes, step_sum = frames(hidden, c0, [top_1] * 3, [torch.Generator().manual_seed(1) for _ in range(3)])
    oracle_codes, oracle_sum = predict_residual_codes(predictor, hidden, c0, predictor.new_cache(3), [GREEDY] * 3)
    assert torch.equal(greedy_codes, step_codes) and torch.equal(greedy_codes, oracle_codes)
    assert torch.equal(greedy_sum, step_sum)
    torch.testing.assert_close(greedy_sum, oracle_sum, atol=1e-6, rtol=0)


@torch.no_grad()
def test_frame_with_c0_picked_in_the_same_call_equals_sampling_c0_first(model):
    """`FramePredictor.with_c0` (the talker engine's greedy path: c0's pick inside the frame's call) gives the c0 that
    `sample_next` picks from the codec head with the talker's penalty and suppressed codes, and then the frame and
    summed embeddings that the residual codes of that c0 give, bit for bit."""
    talker = model.talker
    V, H = talker.codec_head.weight.shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, H, generator=g)
    seen = torch.rand(3, V, generator=g) < 0.3
    params = [talker_sampling(talker.cfg, SamplingParams(repetition_penalty=p)) for p in (1.05, 1.0, 1.3)]
    frames = FramePredictor(talker.code_predictor, 3, c0_head=talker.codec_head.weight,
                            c0_table=talker.model.codec_embedding.weight)
    banned = suppressed_mask(tuple(p.suppress_ranges for p in params), V, "cpu")
    penalty = torch.tensor([p.repetition_penalty for p in params])
    got, got_sum = frames.with_c0(hidden, seen, penalty, banned)

    c0 = sample_next(talker.codec_head(hidden), params, seen=seen)
    residual, want_sum = frames(hidden, talker.model.codec_embedding(c0), [GREEDY] * 3, [None] * 3)
    assert torch.equal(got, torch.cat([c0[:, None], residual], dim=1)) and torch.equal(got_sum, want_sum)
    assert not torch.equal(c0, talker.codec_head(hidden).argmax(-1))  # the penalty and the suppression took part


@torch.no_grad()
def test_code_predictor_cache_equals_recomputation(model):
    """The predictor's KV cache (allocated once, cleared per frame) gives the codes a full recomputation of the
    growing sequence gives, frame after frame."""
    predictor = model.talker.code_predictor
    groups = predictor.cfg.num_code_groups
    g = torch.Generator().manual_seed(0)
    cache = predictor.new_cache(2)
    greedy = [SamplingParams()] * 2
    for _ in range(2):  # two frames through the same cache
        hidden = torch.randn(2, predictor.cfg.hidden_size, generator=g)
        c0 = torch.randn(2, predictor.cfg.hidden_size, generator=g)
        codes, embed_sum = predict_residual_codes(predictor, hidden, c0, cache, greedy)
        seq = torch.stack([hidden, c0], dim=1)  # [B, 2, H]
        ref = []
        for step in range(groups - 1):
            fresh = predictor.new_cache(2)
            out = predictor(seq, fresh)[:, -1]  # whole sequence, no reuse
            code = predictor.lm_head[step](out).argmax(-1)
            ref.append(code)
            seq = torch.cat([seq, predictor.model.codec_embedding[step](code)[:, None]], dim=1)
        assert torch.equal(codes, torch.stack(ref, dim=1))
        torch.testing.assert_close(embed_sum, seq[:, 1:].sum(1), atol=1e-6, rtol=0)


@torch.no_grad()
def test_streamed_text_gives_the_same_frames(model, hf_processor, tiny_ckpt):
    """The service form: the talker starts after the first reply token and thinker tokens are pushed one per
    step as they are needed; the frames equal those decoded with the whole reply known up front."""
    proc = hf_processor(tiny_ckpt)
    messages = [{"role": "user", "content": [{"type": "text", "text": "The quick brown fox jumps."}]}]
    inputs = proc(text=[proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)],
                  return_tensors="pt")
    cfg = model.cfg
    prompt = model._thinker_prompt(dict(inputs), use_audio_in_video=False)
    reply = thinker_generate(model.thinker, prompt, [SamplingParams(max_new_tokens=8)], speaking=[True],
                             accept_hidden_layer=cfg.talker_config.accept_hidden_layer)[0]
    voice = speaker_codec_id(cfg.talker_config, "ethan")
    params = [talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=12, repetition_penalty=1.05))]

    whole = TalkerRequest(cfg, reply.talker_prompt, voice)
    for chunk in reply.talker_chunks:
        whole.push(chunk)
    expected = generate_codes(model.talker, cfg, [whole], params)[0]

    streamed = TalkerRequest(cfg, reply.talker_prompt, voice)
    chunks = iter(reply.talker_chunks)
    streamed.push(next(chunks))
    assert streamed.prefill_ready and not streamed.entry_ready(0)
    frames = []
    steps = stream_frames(model.talker, cfg, [streamed], params)
    for step_index, step in enumerate(steps):
        if step.frames[0] is not None:
            frames.append(step.frames[0])
        while not streamed.entry_ready(step_index):  # what the next step needs
            streamed.push(next(chunks))
    assert expected.shape[-1] == 11  # 12 codebook-0 tokens, the last without residual codes
    assert torch.equal(torch.stack(frames, dim=1), expected)


def test_talker_running_ahead_of_the_thinker_is_an_error(model, tiny_ckpt):
    cfg = model.cfg
    ids = torch.tensor([cfg.im_start_token_id, cfg.user_token_id, 198, 50, cfg.im_end_token_id, 198,
                        cfg.im_start_token_id, cfg.assistant_token_id, 198])
    from common.messages import TalkerPrompt, ThinkerTokens

    hidden = cfg.thinker_config.text_config.hidden_size
    prompt = TalkerPrompt("r", ids, torch.randn(len(ids), hidden), torch.randn(0, hidden))  # no media: no states
    request = TalkerRequest(cfg, prompt, speaker_codec_id(cfg.talker_config, "aiden"))
    request.push(ThinkerTokens("r", [60], torch.randn(1, hidden)))
    params = [talker_sampling(cfg.talker_config, SamplingParams(max_new_tokens=5))]
    steps = stream_frames(model.talker, cfg, [request], params)
    next(steps)
    with pytest.raises(RuntimeError, match="ran ahead"):
        next(steps)
    assert np.isfinite(request.assistant_embeds[-1].numpy()).all()
