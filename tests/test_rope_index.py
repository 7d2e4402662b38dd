"""get_rope_index vs transformers' (thinker and talker) on both tiny configs: image, video, audio,
audio-in-video, left-padded batches; and the checks transformers does not make."""

import numpy as np
import pytest
import torch

from common.config import load_config
from common.errors import InvalidRequestError
from common.lengths import audio_token_count
from stages.rope_index import RopeIndexSpec, count_blocks, get_rope_index


@pytest.fixture(params=["tiny_ckpt", "tiny_ckpt_alt"])
def setup(request, hf_model):
    ckpt = request.getfixturevalue(request.param)
    cfg = load_config(ckpt)
    return cfg, hf_model(ckpt)


def ids_of(cfg):
    t = cfg.thinker_config
    return dict(image=t.image_token_id, video=t.video_token_id, audio=t.audio_token_id,
                vs=t.vision_start_token_id, ve=t.vision_end_token_id, as_=t.audio_start_token_id,
                ae=t.audio_end_token_id)


def video_with_audio(ids, grid, spg, n_audio, pps=13, merge=2):
    """The processor's interleaving of a video's tokens with its audio tokens."""
    t, h, w = grid
    per_t = h * w // merge**2
    video_t = [tau * spg * pps for tau in range(t) for _ in range(per_t)]
    out, v, a = [], 0, 0
    while v < len(video_t) and a < n_audio:
        if video_t[v] <= a:
            out.append(ids["video"])
            v += 1
        else:
            out.append(ids["audio"])
            a += 1
    return out + [ids["video"]] * (len(video_t) - v) + [ids["audio"]] * (n_audio - a)


def left_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


def compare(ours, ref, mask):
    pos, delta = ours
    ref_pos, ref_delta = ref
    valid = mask.bool()
    assert pos.dtype == torch.float32 and pos.shape == ref_pos.shape
    assert torch.equal(pos[:, valid], ref_pos[:, valid].float())
    assert torch.equal(delta, ref_delta.reshape(-1).float())


def test_image_audio_video_left_padded_batch(setup):
    cfg, hf = setup
    k = ids_of(cfg)
    spec = RopeIndexSpec.for_thinker(cfg.thinker_config)
    n_audio = [audio_token_count(f) for f in (300, 157)]
    rows = [
        [1, 2, 3, k["vs"]] + [k["image"]] * 6 + [k["ve"], k["as_"]] + [k["audio"]] * n_audio[0] + [k["ae"], 4, 5],
        [7, k["vs"]] + [k["video"]] * 12 + [k["ve"], 8, k["as_"]] + [k["audio"]] * n_audio[1] + [k["ae"], 9,
         k["vs"]] + [k["image"]] * 4 + [k["ve"], 11],
        [5, 6, 7],
    ]
    ids, mask = left_pad(rows)
    kw = dict(image_grid_thw=torch.tensor([[1, 4, 6], [1, 2, 8]]), video_grid_thw=torch.tensor([[3, 4, 4]]),
              video_second_per_grid=torch.tensor([2 / 3]), audio_feature_lengths=torch.tensor([300, 157]))
    ours = get_rope_index(spec, ids, mask, **kw)
    ref = hf.thinker.get_rope_index(ids, kw["image_grid_thw"], kw["video_grid_thw"], mask, False,
                                    kw["audio_feature_lengths"], kw["video_second_per_grid"])
    compare(ours, ref, mask)
    assert ours[0][0, 1].frac().abs().sum() > 0  # fractional video time positions really exercised
    assert count_blocks(ids[1][mask[1].bool()], spec) == {"image": 1, "video": 1, "audio": 1}


@pytest.mark.parametrize("spg,audio_frames", [(1.0, 300), (2 / 3, 150), (0.5, 420)])
def test_audio_in_video(setup, spg, audio_frames):
    cfg, hf = setup
    k = ids_of(cfg)
    spec = RopeIndexSpec.for_thinker(cfg.thinker_config)
    grid = (3, 4, 4)
    block = video_with_audio(k, grid, spg, audio_token_count(audio_frames))
    rows = [[1, 2, 3, k["vs"], k["as_"]] + block + [k["ae"], k["ve"], 4, 5],
            [6, k["as_"]] + [k["audio"]] * audio_token_count(100) + [k["ae"], 7]]
    ids, mask = left_pad(rows)
    kw = dict(video_grid_thw=torch.tensor([grid]), video_second_per_grid=torch.tensor([spg]),
              audio_feature_lengths=torch.tensor([audio_frames, 100]))
    ours = get_rope_index(spec, ids, mask, use_audio_in_video=True, **kw)
    ref = hf.thinker.get_rope_index(ids, None, kw["video_grid_thw"], mask, True, kw["audio_feature_lengths"],
                                    kw["video_second_per_grid"])
    compare(ours, ref, mask)


def test_reference_worked_example(tiny_ckpt):
    """A worked example: grid 3×4×4, 39 audio tokens, spg 1 s, pps 13 → T row 0 1 2 3 4 | 5 5 5 5 | 5 6 …, delta −12."""
    cfg = load_config(tiny_ckpt)
    k = ids_of(cfg)
    block = video_with_audio(k, (3, 4, 4), 1.0, 39)
    ids = torch.tensor([[1, 2, 3, k["vs"], k["as_"]] + block + [k["ae"], k["ve"]]])
    pos, delta = get_rope_index(RopeIndexSpec.for_thinker(cfg.thinker_config), ids,
                                video_grid_thw=torch.tensor([[3, 4, 4]]), video_second_per_grid=torch.tensor([1.0]),
                                audio_feature_lengths=torch.tensor([300]), use_audio_in_video=True)
    assert pos[0, 0, :12].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 6, 7]
    assert delta.tolist() == [-12.0]


def test_text_and_audio_only_match_transformers_fallback(setup):
    cfg, hf = setup
    k = ids_of(cfg)
    spec = RopeIndexSpec.for_thinker(cfg.thinker_config)
    rows = [[1, 2, 3, 4], [5, k["as_"]] + [k["audio"]] * audio_token_count(80) + [k["ae"], 6]]
    ids, mask = left_pad(rows)
    lengths = torch.tensor([80])
    ours = get_rope_index(spec, ids, mask, audio_feature_lengths=lengths)
    ref = hf.thinker.get_rope_index(ids, None, None, mask, False, lengths, None)
    compare(ours, ref, mask)


def test_processor_output_matches_transformers(setup, hf_processor, request):
    cfg, hf = setup
    from PIL import Image

    ckpt = request.getfixturevalue(request.node.callspec.params["setup"])
    proc = hf_processor(ckpt)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8))
    audio = (rng.standard_normal(int(2.3 * 16000)) * 0.1).astype(np.float32)
    texts = [proc.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
             for c in ([{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What?"}],
                       [{"type": "text", "text": "Hi"}])]
    inputs = proc(text=texts, images=[img], audio=[audio], return_tensors="pt", padding=True)
    spec = RopeIndexSpec.for_thinker(cfg.thinker_config)
    lengths = inputs["feature_attention_mask"].sum(-1)
    ours = get_rope_index(spec, inputs["input_ids"], inputs["attention_mask"],
                          image_grid_thw=inputs["image_grid_thw"], audio_feature_lengths=lengths)
    ref = hf.thinker.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], None, inputs["attention_mask"],
                                    False, lengths, None)
    compare(ours, ref, inputs["attention_mask"])


def test_talker_spec_matches_transformers_talker(setup):
    """The talker's MRoPE over user turns; ours takes n_window from the thinker's audio config (the talker config has none; transformers crashes on it)."""
    cfg, hf = setup
    k = ids_of(cfg)
    spec = RopeIndexSpec.for_talker(cfg.talker_config, cfg.thinker_config)
    tts_pad = cfg.tts_pad_token_id
    rows = [[1, 2, k["vs"]] + [k["image"]] * 6 + [k["ve"], k["as_"]] + [k["audio"]] * audio_token_count(230)
            + [k["ae"], 3] + [tts_pad] * 9]
    ids, mask = left_pad(rows)
    kw = dict(image_grid_thw=torch.tensor([[1, 4, 6]]), audio_feature_lengths=torch.tensor([230]))
    ours = get_rope_index(spec, ids, mask, **kw)
    ref = hf.talker.get_rope_index(ids, kw["image_grid_thw"], None, mask, False, kw["audio_feature_lengths"], None)
    compare(ours, ref, mask)


def test_mismatches_are_clear_errors(tiny_ckpt):
    cfg = load_config(tiny_ckpt)
    k = ids_of(cfg)
    spec = RopeIndexSpec.for_thinker(cfg.thinker_config)
    audio = torch.tensor([[1, k["as_"]] + [k["audio"]] * 12 + [k["ae"]]])
    with pytest.raises(InvalidRequestError, match="audio"):  # 13 tokens expected for 100 frames, 12 given
        get_rope_index(spec, audio, audio_feature_lengths=torch.tensor([100]))
    with pytest.raises(InvalidRequestError, match="audio"):  # placeholders but no audio
        get_rope_index(spec, audio)
    image = torch.tensor([[1, k["vs"]] + [k["image"]] * 6 + [k["ve"]]])
    with pytest.raises(InvalidRequestError, match="image"):  # grid says 4 tokens
        get_rope_index(spec, image, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(InvalidRequestError, match="image"):  # an unused grid
        get_rope_index(spec, image, image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 6]]))
