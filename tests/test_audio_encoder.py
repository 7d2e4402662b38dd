"""Audio encoder against transformers' Qwen3OmniMoeAudioEncoder on the same weights (CPU, fp32)."""

import math
from dataclasses import fields

import pytest
import torch
from torch import nn

from common.config import AudioEncoderConfig
from common.lengths import audio_token_count
from stages.audio_encoder import AudioEncoder

# Two shapes: the reference oracle's tiny audio tower (100-frame chunks, 26-token windows) and an odd one
# (3-chunk windows, mel bins that do not halve evenly, head dim 16, conv batches of 3 chunks). Both keep
# n_window = 50: transformers hard-codes 13 tokens per full chunk (see test_other_chunk_sizes).
SHAPES = {
    "default": dict(
        num_mel_bins=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
        activation_function="gelu", scale_embedding=False, max_source_positions=1500, n_window=50,
        n_window_infer=200, conv_chunksize=500, downsample_hidden_size=16, output_dim=64,
    ),
    "odd": dict(
        num_mel_bins=20, encoder_layers=3, encoder_attention_heads=3, encoder_ffn_dim=40, d_model=48,
        activation_function="gelu", scale_embedding=False, max_source_positions=100, n_window=50,
        n_window_infer=300, conv_chunksize=3, downsample_hidden_size=8, output_dim=24,
    ),
}


def unit_scale_(module: nn.Module, seed: int) -> None:
    """Weights at unit activation scale (transformers' std-0.02 init would make every output ~0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def build_pair(shape: str | dict, seed: int = 0) -> tuple[AudioEncoder, nn.Module]:
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    raw = SHAPES[shape] if isinstance(shape, str) else shape
    hf = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**raw)).eval()
    unit_scale_(hf, seed)
    ours = AudioEncoder(AudioEncoderConfig(**{f.name: raw[f.name] for f in fields(AudioEncoderConfig)})).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # same parameter names, sinusoid table not persistent
    return ours, hf


def padded_batch(lengths: list[int], mels: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random log-mel [B, M, T] with NaN in the padding (it must never be read), and the lengths [B]."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), mels, max(lengths) + 7, generator=g)
    for b, length in enumerate(lengths):
        feats[b, :, length:] = float("nan")
    return feats, torch.tensor(lengths)


def hf_encode(hf: nn.Module, feats: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """What the thinker does: concatenate every audio's valid frames along time -> [M, ΣL], then encode."""
    flat = torch.cat([feats[b, :, :length] for b, length in enumerate(lens.tolist())], dim=1)
    return hf(flat, feature_lens=lens).last_hidden_state


@pytest.mark.parametrize("shape", SHAPES)
@torch.no_grad()
def test_matches_transformers_several_audios(shape):
    ours, hf = build_pair(shape)
    k = 2 * SHAPES[shape]["n_window"]
    window = audio_token_count(k, SHAPES[shape]["n_window"]) * (SHAPES[shape]["n_window_infer"] // k)
    # shorter than a chunk, exactly one chunk, not a multiple of a chunk and longer than an attention window,
    # exactly two windows, one frame, several windows plus a remainder
    lengths = [k * 3 // 5, k, 2 * k + k // 2 + 1, (window // audio_token_count(k, SHAPES[shape]["n_window"])) * 2 * k,
               1, 5 * k + 37]
    feats, lens = padded_batch(lengths, SHAPES[shape]["num_mel_bins"])

    got = ours(feats, lens)
    want = hf_encode(hf, feats, lens)
    assert got.shape == (sum(audio_token_count(n, SHAPES[shape]["n_window"]) for n in lengths),
                         SHAPES[shape]["output_dim"])
    assert got.shape == want.shape
    assert want.abs().mean() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_each_audio_encodes_as_if_alone():
    """An audio's tokens do not depend on the other audios of the call (windows never cross audios)."""
    ours, _ = build_pair("default")
    lengths = [250, 537, 100]
    feats, lens = padded_batch(lengths, 32)
    together = ours(feats, lens).split([audio_token_count(n) for n in lengths])
    for b, n in enumerate(lengths):
        alone = ours(feats[b : b + 1, :, :n], lens[b : b + 1])
        torch.testing.assert_close(together[b], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_short_audios_alone_are_batch_invariant_unlike_transformers():
    """Named difference: transformers zero-pads the conv chunks to the longest chunk *of the call*, so an audio
    shorter than one chunk encodes differently alone than beside a longer audio (the convolutions read the
    padding's post-GELU bias). We always pad to the full 2·n_window frames: the result is the one transformers
    gives whenever the call holds a full chunk (its normal case), for every call."""
    ours, hf = build_pair("default")
    short, long = 50, 250
    feats, lens = padded_batch([short, long], 32)
    n_short = audio_token_count(short)

    ours_alone = ours(feats[:1, :, :short], lens[:1])
    hf_alone = hf_encode(hf, feats[:1], lens[:1])
    hf_beside_long = hf_encode(hf, feats, lens)[:n_short]
    torch.testing.assert_close(ours_alone, hf_beside_long, rtol=0, atol=1e-5)
    assert (hf_alone - hf_beside_long).abs().max() > 1e-3  # transformers' batch dependence


@torch.no_grad()
def test_other_chunk_sizes():
    """Named difference: transformers' length helper hard-codes 13 tokens per full chunk (true only for
    n_window = 50) and fails for any other n_window; ours derives the count from the config."""
    raw = dict(SHAPES["default"], n_window=25, n_window_infer=150)  # 50-frame chunks of 7 tokens, 21-token windows
    ours, hf = build_pair(raw)
    lengths = [30, 50, 173]
    feats, lens = padded_batch(lengths, 32)
    got = ours(feats, lens)
    assert got.shape[0] == sum(audio_token_count(n, n_window=25) for n in lengths) == 4 + 7 + (3 * 7 + 3)
    for b, part in enumerate(got.split([audio_token_count(n, n_window=25) for n in lengths])):
        torch.testing.assert_close(part, ours(feats[b : b + 1, :, : lengths[b]], lens[b : b + 1]), rtol=0, atol=1e-5)
    with pytest.raises(IndexError):
        hf_encode(hf, feats, lens)


@torch.no_grad()
def test_empty_audio_gives_no_tokens():
    ours, _ = build_pair("default")
    feats, lens = padded_batch([120, 0, 70], 32)
    got = ours(feats, lens)
    without_empty = ours(feats[[0, 2]], lens[[0, 2]])
    torch.testing.assert_close(got, without_empty, rtol=0, atol=1e-5)
    assert ours(feats[:1], torch.tensor([0])).shape == (0, 64)


def test_reset_buffers_after_meta_materialisation():
    """The sinusoid table is not in the checkpoint: built on meta and materialised, it must be recomputable."""
    ours, _ = build_pair("default")
    with torch.device("meta"):
        fresh = AudioEncoder(ours.cfg)
    fresh = fresh.to_empty(device="cpu")
    fresh.load_state_dict(ours.state_dict(), strict=True)
    fresh.reset_buffers()
    torch.testing.assert_close(fresh.positions, ours.positions, rtol=0, atol=0)
    assert "positions" not in ours.state_dict()


def test_bad_inputs_raise_typed_errors():
    from common.errors import InvalidRequestError

    ours, _ = build_pair("default")
    feats, lens = padded_batch([100, 50], 32)
    with pytest.raises(InvalidRequestError, match="input_features"):
        ours(feats[:, :-1], lens)  # wrong mel bins
    with pytest.raises(InvalidRequestError, match="feature_lens"):
        ours(feats, torch.tensor([100]))
    with pytest.raises(InvalidRequestError, match="feature_lens"):
        ours(feats, torch.tensor([100, feats.shape[2] + 1]))


# ---- on the tiny checkpoints, loaded through common/checkpoint.py with only the audio tower's prefix ----


def load_audio_encoder(ckpt) -> AudioEncoder:
    from common.checkpoint import STAGE_PREFIXES, load_stage_weights
    from common.config import load_config

    with torch.device("meta"):
        encoder = AudioEncoder(load_config(ckpt).thinker_config.audio_config)
    return load_stage_weights(encoder, ckpt, STAGE_PREFIXES["audio_encoder"], torch.float32, "cpu").eval()


@torch.no_grad()
def test_tiny_checkpoint_matches_transformers(any_tiny_ckpt, hf_model):
    ours = load_audio_encoder(any_tiny_ckpt)
    cfg = ours.cfg
    hf = hf_model(any_tiny_ckpt).thinker.model.audio_tower
    window_frames = cfg.n_window_infer
    # < one chunk, one chunk, two windows plus a partial chunk, one frame, > 30 s (the feature extractor's clip)
    lengths = [37, 2 * cfg.n_window, 2 * window_frames + 3 * cfg.n_window + 1, 1, 3217]
    feats, lens = padded_batch(lengths, cfg.num_mel_bins)
    got = ours(feats, lens)
    want = hf_encode(hf, feats, lens)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
