"""Vision encoder against transformers' Qwen3OmniMoeVisionEncoder on the same weights (CPU, fp32)."""

import math
from dataclasses import fields

import pytest
import torch
from torch import nn

from common.config import VisionEncoderConfig
from stages.vision_encoder import VisionEncoder

# Two shapes: the reference oracle's tiny vision tower (8×8 learned grid, DeepStack after blocks 0 and 1) and
# an odd one (head dim 16, 6×6 grid, three DeepStack levels, one block without a tap).
SHAPES = {
    "default": dict(
        depth=2, hidden_size=32, hidden_act="gelu_pytorch_tanh", intermediate_size=64, num_heads=2, in_channels=3,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    ),
    "odd": dict(
        depth=4, hidden_size=48, hidden_act="gelu_pytorch_tanh", intermediate_size=40, num_heads=3, in_channels=3,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=40, num_position_embeddings=36,
        deepstack_visual_indexes=[0, 2, 3],
    ),
}
# Images of different grids (smaller and larger than the learned grid, one 2×2 block) and a 3-frame video.
GRIDS = [(1, 4, 6), (1, 2, 2), (3, 4, 4), (1, 10, 14), (1, 6, 4)]


def unit_scale_(module: nn.Module, seed: int) -> None:
    """Weights at unit activation scale (transformers' std-0.02 init would make every output ~0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def our_config(raw: dict) -> VisionEncoderConfig:
    values = {f.name: raw[f.name] for f in fields(VisionEncoderConfig) if f.name in raw}
    return VisionEncoderConfig(**dict(values, deepstack_visual_indexes=tuple(raw["deepstack_visual_indexes"])))


def build_pair(shape: str, seed: int = 0) -> tuple[VisionEncoder, nn.Module]:
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

    raw = SHAPES[shape]
    hf = Qwen3OmniMoeVisionEncoder(Qwen3OmniMoeVisionEncoderConfig(**raw)).eval()
    unit_scale_(hf, seed)
    ours = VisionEncoder(our_config(raw)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def random_patches(grids: list[tuple[int, int, int]], cfg: VisionEncoderConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor(grids)
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    return torch.randn(int(grid_thw.prod(1).sum()), patch_dim, generator=g), grid_thw


@pytest.mark.parametrize("shape", SHAPES)
@torch.no_grad()
def test_matches_transformers(shape):
    ours, hf = build_pair(shape)
    pixels, grid_thw = random_patches(GRIDS, ours.cfg)

    merged, deepstack = ours(pixels, grid_thw)
    want = hf(pixels, grid_thw=grid_thw)
    n_tokens = pixels.shape[0] // 4
    assert merged.shape == (n_tokens, ours.cfg.out_hidden_size)
    assert len(deepstack) == len(want.deepstack_features) == len(ours.cfg.deepstack_visual_indexes)
    assert want.pooler_output.abs().mean() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(merged, want.pooler_output, rtol=0, atol=1e-5)
    for got_level, want_level in zip(deepstack, want.deepstack_features):
        assert got_level.shape == (n_tokens, ours.cfg.out_hidden_size)
        torch.testing.assert_close(got_level, want_level, rtol=0, atol=1e-5)


@torch.no_grad()
def test_each_image_encodes_as_if_alone():
    """Attention never crosses images or video frames: batching changes nothing."""
    ours, _ = build_pair("default")
    pixels, grid_thw = random_patches(GRIDS, ours.cfg)
    merged, deepstack = ours(pixels, grid_thw)
    sizes = grid_thw.prod(1).tolist()
    tokens = [s // 4 for s in sizes]
    for i, (patches, grid) in enumerate(zip(pixels.split(sizes), grid_thw)):
        alone, alone_deepstack = ours(patches, grid[None])
        torch.testing.assert_close(merged.split(tokens)[i], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(deepstack[-1].split(tokens)[i], alone_deepstack[-1], rtol=0, atol=1e-5)


@torch.no_grad()
def test_video_frames_attend_separately():
    """A t-frame video gives the same tokens as its t frames given as t one-frame images."""
    ours, _ = build_pair("default")
    pixels, grid_thw = random_patches([(3, 4, 6)], ours.cfg)
    video, _ = ours(pixels, grid_thw)
    frames, _ = ours(pixels, torch.tensor([(1, 4, 6)] * 3))
    torch.testing.assert_close(video, frames, rtol=0, atol=1e-5)


def test_bad_inputs_raise_typed_errors():
    from common.errors import InvalidRequestError

    ours, _ = build_pair("default")
    pixels, grid_thw = random_patches([(1, 4, 6)], ours.cfg)
    with pytest.raises(InvalidRequestError, match="pixel_values"):
        ours(pixels[:-1], grid_thw)
    with pytest.raises(InvalidRequestError, match="grid_thw"):
        ours(pixels, torch.tensor([[1, 3, 8]]))  # h not divisible by the merge size
    with pytest.raises(InvalidRequestError, match="grid_thw"):
        ours(pixels, torch.tensor([1, 4, 6]))


# ---- on the tiny checkpoints, loaded through common/checkpoint.py with only the vision tower's prefix ----


def load_vision_encoder(ckpt) -> VisionEncoder:
    from common.checkpoint import STAGE_PREFIXES, load_stage_weights
    from common.config import load_config

    with torch.device("meta"):
        encoder = VisionEncoder(load_config(ckpt).thinker_config.vision_config)
    return load_stage_weights(encoder, ckpt, STAGE_PREFIXES["vision_encoder"], torch.float32, "cpu").eval()


@torch.no_grad()
def test_tiny_checkpoint_matches_transformers(any_tiny_ckpt, hf_model):
    ours = load_vision_encoder(any_tiny_ckpt)
    hf = hf_model(any_tiny_ckpt).thinker.model.visual
    pixels, grid_thw = random_patches(GRIDS, ours.cfg)
    merged, deepstack = ours(pixels, grid_thw)
    want = hf(pixels, grid_thw=grid_thw)
    assert len(deepstack) == len(want.deepstack_features) == len(ours.cfg.deepstack_visual_indexes)
    assert want.pooler_output.abs().mean() > 0.1
    torch.testing.assert_close(merged, want.pooler_output, rtol=0, atol=1e-5)
    for got_level, want_level in zip(deepstack, want.deepstack_features):
        torch.testing.assert_close(got_level, want_level, rtol=0, atol=1e-5)
