"""ThinkerLM and its generation vs transformers on both tiny checkpoints (fp32, CPU); fast path vs slow path."""

import numpy as np
import pytest
import torch

from common.checkpoint import fuse_projections
from common.config import load_config
from common.errors import InvalidRequestError
from common.sampling import SamplingParams
from stages.handoff import multimodal_mask
from stages.layers import attention_mask
from stages.rope_index import get_rope_index
from stages.thinker import ThinkerLM, ThinkerPrompt, generate, stream_generate

SR = 16000


def test_from_pretrained_loads_the_same_tensors_as_transformers(any_tiny_ckpt, hf_model):
    ours = ThinkerLM.from_pretrained(any_tiny_ckpt)
    hf = hf_model(any_tiny_ckpt)
    prefix = "thinker.model.language_model."
    ref = {"model." + k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    ref["lm_head.weight"] = hf.thinker.lm_head.weight
    ref = fuse_projections(ours, ref)  # q/k/v and gate/up rows concatenated, as ours holds them
    state = ours.state_dict()
    assert set(state) == set(ref)
    for name, tensor in state.items():
        assert torch.equal(tensor, ref[name]), name
    torch.testing.assert_close(ours.model.rotary.inv_freq, hf.thinker.model.language_model.rotary_emb.inv_freq,
                               rtol=0, atol=0)


def chirp(seconds, f0=300.0, f1=2000.0):
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * (f0 + (f1 - f0) * t / seconds / 2) * t)).astype(np.float32)


def image(h=80, w=96, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def render(proc, content, system=True):
    messages = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": "You are Qwen."}]})
    messages.append({"role": "user", "content": content})
    return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def mixed_inputs(proc, texts_images_audios):
    """Processor output for a batch of (text, [images], [audios]) user turns (left-padded)."""
    texts, images, audios = [], [], []
    for text, imgs, auds in texts_images_audios:
        content = [{"type": "image"} for _ in imgs] + [{"type": "audio"} for _ in auds]
        texts.append(render(proc, content + [{"type": "text", "text": text}]))
        images += imgs
        audios += auds
    kwargs = {}
    if images:
        kwargs["images"] = images
    if audios:
        kwargs["audio"] = audios
    return proc(text=texts, return_tensors="pt", padding=True, **kwargs)


@torch.no_grad()
def encoder_outputs(hf, inputs):
    """transformers' audio/vision encoder outputs for the processor output, as a ThinkerPrompt."""
    tm = hf.thinker.model
    prompt = ThinkerPrompt(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    if "input_features" in inputs:
        prompt.audio_features = tm.get_audio_features(
            inputs["input_features"], inputs["feature_attention_mask"]
        ).last_hidden_state
        prompt.audio_feature_lengths = inputs["feature_attention_mask"].sum(-1)
    if "pixel_values" in inputs:
        out = tm.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        prompt.image_features = out.pooler_output
        prompt.image_deepstack = list(out.deepstack_features)
        prompt.image_grid_thw = inputs["image_grid_thw"]
    return prompt


@pytest.fixture(params=["tiny_ckpt", "tiny_ckpt_alt"])
def setup(request, hf_model, hf_processor):
    ckpt = request.getfixturevalue(request.param)
    hf = hf_model(ckpt)
    return ckpt, hf, hf_processor(ckpt), ThinkerLM.from_pretrained(ckpt)


BATCH = [
    ("What can you see and hear?", [image()], [chirp(3.0)]),
    ("Hello world", [], []),
    ("Describe the audio.", [], [chirp(1.3, 500, 900)]),
]


@torch.no_grad()
def full_logits(model, prompt):
    embeds, visual_mask, deepstack = model.embed_prompt(prompt)
    valid = prompt.attention_mask.bool()
    positions, _ = get_rope_index(
        model.rope_spec, prompt.input_ids, valid, image_grid_thw=prompt.image_grid_thw,
        audio_feature_lengths=prompt.audio_feature_lengths,
    )
    B, T = prompt.input_ids.shape
    mask = attention_mask(torch.arange(T).expand(B, T), valid)
    hidden, _ = model(embeds, positions, mask, visual_mask=visual_mask, deepstack=deepstack)
    return model.logits(hidden)


def test_logits_match_transformers_on_mixed_prompt(setup):
    ckpt, hf, proc, ours = setup
    inputs = mixed_inputs(proc, BATCH[:1])
    with torch.no_grad():
        ref = hf.thinker(**inputs).logits
    logits = full_logits(ours, encoder_outputs(hf, inputs))
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max() <= 1e-4


def test_left_padded_batch_logits_match_transformers(setup):
    ckpt, hf, proc, ours = setup
    inputs = mixed_inputs(proc, BATCH)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # really padded
    with torch.no_grad():
        ref = hf.thinker(**inputs).logits
    logits = full_logits(ours, encoder_outputs(hf, inputs))
    valid = inputs["attention_mask"].bool()
    assert (logits[valid] - ref[valid]).abs().max() <= 1e-4


def im_end(proc):
    return proc.tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("penalty", [1.0, 1.05])
def test_greedy_20_tokens_match_transformers_generate(setup, penalty):
    ckpt, hf, proc, ours = setup
    inputs = mixed_inputs(proc, BATCH[:1])
    eos = im_end(proc)
    with torch.no_grad():
        ref = hf.thinker.generate(**inputs, max_new_tokens=20, do_sample=False, repetition_penalty=penalty,
                                  eos_token_id=eos)
    ref_new = ref[0, inputs["input_ids"].shape[1]:].tolist()
    params = SamplingParams(max_new_tokens=20, repetition_penalty=penalty, stop_token_ids=(eos,))
    (result,) = generate(ours, encoder_outputs(hf, inputs), [params])
    assert result.token_ids == ref_new
    assert result.finish_reason == ("stop" if ref_new[-1] == eos else "length")


def test_seeded_sampling_matches_transformers(setup):
    """Same seed, same draws: our per-request generator reproduces transformers' global-RNG sampling."""
    ckpt, hf, proc, ours = setup
    inputs = mixed_inputs(proc, BATCH[1:2])
    eos = im_end(proc)
    torch.manual_seed(1234)
    with torch.no_grad():
        ref = hf.thinker.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20,
                                  top_p=0.9, repetition_penalty=1.05, eos_token_id=eos)
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                            repetition_penalty=1.05, seed=1234, stop_token_ids=(eos,))
    (result,) = generate(ours, encoder_outputs(hf, inputs), [params])
    assert result.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_left_padded_batch_matches_one_by_one(setup):
    ckpt, hf, proc, ours = setup
    eos = im_end(proc)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(eos,))
    batch = generate(ours, encoder_outputs(hf, mixed_inputs(proc, BATCH)), [params] * 3)
    for row, item in enumerate(BATCH):
        (single,) = generate(ours, encoder_outputs(hf, mixed_inputs(proc, [item])), [params])
        assert batch[row].token_ids == single.token_ids


def test_sampled_rows_reproducible_and_independent_of_batch(setup):
    ckpt, hf, proc, ours = setup
    prompt = encoder_outputs(hf, mixed_inputs(proc, BATCH))
    sampled = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.3, top_k=5, top_p=0.9, seed=7)
    greedy = SamplingParams(max_new_tokens=8)
    a = generate(ours, prompt, [sampled, greedy, sampled])
    b = generate(ours, prompt, [sampled, greedy, sampled.__class__(**{**sampled.__dict__, "seed": 8})])
    assert a[0].token_ids == b[0].token_ids  # same seed, same tokens, whatever the other rows do
    assert a[1].token_ids == b[1].token_ids
    single = generate(ours, encoder_outputs(hf, mixed_inputs(proc, BATCH[:1])), [sampled])
    assert single[0].token_ids == a[0].token_ids


def test_stream_yields_per_step_and_finishes_rows(setup):
    ckpt, hf, proc, ours = setup
    prompt = encoder_outputs(hf, mixed_inputs(proc, BATCH[1:]))
    params = [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=5)]
    steps = list(stream_generate(ours, prompt, params))
    assert len(steps) == 5
    assert [s.token_ids[0] is None for s in steps] == [False] * 3 + [True] * 2
    assert steps[2].finish_reasons == ["length", None] and steps[4].finish_reasons == [None, "length"]


def test_talker_messages(setup):
    ckpt, hf, proc, ours = setup
    cfg = load_config(ckpt)
    layer = cfg.talker_config.accept_hidden_layer
    inputs = mixed_inputs(proc, BATCH[:2])
    prompt = encoder_outputs(hf, inputs)
    params = [SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=2)]
    results = generate(ours, prompt, params, request_ids=["a", "b"], speaking=[True, False],
                       accept_hidden_layer=layer)
    with torch.no_grad():
        ref = hf.thinker(**inputs, output_hidden_states=True)
    talker = results[0].talker_prompt
    valid = inputs["attention_mask"][0].bool()
    assert talker.request_id == "a" and results[1].talker_prompt is None
    assert torch.equal(talker.prompt_ids, inputs["input_ids"][0][valid])
    torch.testing.assert_close(talker.prompt_embeds, ref.hidden_states[0][0][valid], rtol=0, atol=1e-5)
    media = multimodal_mask(cfg.thinker_config, inputs["input_ids"][0]) & valid  # the talker reads the states there only
    assert int(media.sum()) > 0
    torch.testing.assert_close(talker.prompt_accept_hidden, ref.hidden_states[layer][0][media], rtol=0, atol=1e-4)
    assert torch.equal(talker.image_grid_thw, inputs["image_grid_thw"])
    assert talker.audio_feature_lengths.tolist() == [inputs["feature_attention_mask"][0].sum().item()]
    chunks = results[0].talker_chunks
    assert [c.token_ids[0] for c in chunks] == results[0].token_ids
    assert [c.finished for c in chunks] == [False, False, False, True] and chunks[-1].finish_reason == "length"
    embed = ours.model.embed_tokens.weight
    assert torch.equal(torch.cat([c.token_embeds for c in chunks]), embed[results[0].token_ids])
    assert results[1].talker_chunks == []


def test_audio_placeholder_count_mismatch_is_a_clear_error(setup):
    """transformers scatters audio features without checking the count; we refuse."""
    ckpt, hf, proc, ours = setup
    inputs = mixed_inputs(proc, BATCH[2:3])
    audio_id = hf.thinker.config.audio_token_id
    # drop one audio placeholder: more audio features than placeholders
    ids = inputs["input_ids"][0].tolist()
    del ids[ids.index(audio_id)]
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        hf.thinker(**inputs)  # transformers runs, silently dropping the last audio feature
    with pytest.raises(InvalidRequestError, match="audio placeholders and audio features do not match"):
        generate(ours, encoder_outputs(hf, inputs), [SamplingParams(max_new_tokens=2)])


def test_image_without_features_is_an_error(setup):
    ckpt, hf, proc, ours = setup
    prompt = encoder_outputs(hf, mixed_inputs(proc, BATCH[:1]))
    prompt.image_features = None
    prompt.image_deepstack = None
    with pytest.raises(InvalidRequestError, match="image"):
        generate(ours, prompt, [SamplingParams(max_new_tokens=2)])


def test_right_padding_is_rejected(setup):
    ckpt, hf, proc, ours = setup
    prompt = encoder_outputs(hf, mixed_inputs(proc, BATCH[1:2]))
    prompt.attention_mask = prompt.attention_mask.clone()
    prompt.attention_mask[0, -1] = 0
    with pytest.raises(InvalidRequestError, match="left-padded"):
        generate(ours, prompt, [SamplingParams(max_new_tokens=2)])


def test_logits_with_our_encoders_match_transformers(setup):
    """The whole thinker forward on our own audio and vision encoders (not transformers')."""
    from common.checkpoint import STAGE_PREFIXES, load_stage_weights
    from stages.audio_encoder import AudioEncoder
    from stages.vision_encoder import VisionEncoder

    ckpt, hf, proc, ours = setup
    cfg = load_config(ckpt).thinker_config
    with torch.device("meta"):
        audio_encoder, vision_encoder = AudioEncoder(cfg.audio_config), VisionEncoder(cfg.vision_config)
    load_stage_weights(audio_encoder, ckpt, STAGE_PREFIXES["audio_encoder"], torch.float32, "cpu")
    load_stage_weights(vision_encoder, ckpt, STAGE_PREFIXES["vision_encoder"], torch.float32, "cpu")
    inputs = mixed_inputs(proc, BATCH)
    lengths = inputs["feature_attention_mask"].sum(-1)
    with torch.no_grad():
        merged, deepstack = vision_encoder(inputs["pixel_values"], inputs["image_grid_thw"])
        prompt = ThinkerPrompt(
            inputs["input_ids"], inputs["attention_mask"],
            audio_features=audio_encoder(inputs["input_features"], lengths), audio_feature_lengths=lengths,
            image_features=merged, image_deepstack=deepstack, image_grid_thw=inputs["image_grid_thw"],
        )
        ref = hf.thinker(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (full_logits(ours, prompt)[valid] - ref[valid]).abs().max() <= 1e-4
