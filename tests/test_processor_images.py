"""Image and video-frame preprocessing vs transformers' Qwen2-VL processors (PIL image backend; the torchvision video
processor cannot run here, so its patchify is imported behind a stub and its resize is checked separately)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_video_oracle import hf_patchify
from PIL import Image

from common.errors import InvalidRequestError
from common.image_processing import (
    VisionProcessorConfig,
    patchify,
    preprocess_image,
    preprocess_images,
    preprocess_video,
    preprocess_videos,
    smart_resize,
    video_frame_size,
)


def _cfg(path, **overrides) -> VisionProcessorConfig:
    return VisionProcessorConfig.from_dict(json.loads((Path(path) / "preprocessor_config.json").read_text()),
                                           **overrides)


def _test_images(seed=0):
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    return [
        Image.fromarray(rand(80, 96, 3)),  # the reference's 96×80 image
        Image.fromarray(rand(61, 97, 3)),  # odd sides
        Image.fromarray(rand(20, 300, 3)),  # wide
        Image.fromarray(rand(400, 500, 3)),  # above max_pixels: scaled down
        Image.fromarray(rand(7, 9, 3)),  # below min_pixels: scaled up
        Image.fromarray(rand(50, 70, 4), "RGBA"),  # transparency composited on white
        Image.fromarray(rand(50, 70), "L"),
        Image.fromarray(rand(40, 40, 3)).convert("P"),
        rand(33, 45, 3),  # uint8 array, channels last
    ]


def test_images_equal_transformers(any_tiny_ckpt, hf_processor):
    hf_images = hf_processor(any_tiny_ckpt).image_processor
    images = _test_images()
    ref = hf_images(images, return_tensors="pt")
    pixel_values, grid = preprocess_images(images, _cfg(any_tiny_ckpt))
    assert pixel_values.shape == ref["pixel_values"].shape and pixel_values.dtype == torch.float32
    assert (pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert grid.dtype == torch.int64 and torch.equal(grid, ref["image_grid_thw"])


def test_min_max_pixel_overrides(tiny_ckpt, hf_processor):
    """`from_pretrained(path, min_pixels=..., max_pixels=...)`: the same bounds as transformers' kwargs."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf_images = Qwen2VLImageProcessorPil.from_pretrained(str(tiny_ckpt), min_pixels=64 * 64, max_pixels=96 * 96)
    images = _test_images()[:5]
    ref = hf_images(images, return_tensors="pt")
    pixel_values, grid = preprocess_images(images, _cfg(tiny_ckpt, min_pixels=64 * 64, max_pixels=96 * 96))
    assert torch.equal(grid, ref["image_grid_thw"])
    assert (pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(1)
    bounds = [(32 * 32, 128 * 128), (3136, 12845056), (128 * 32 * 32, 768 * 32 * 32)]
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(1, 4000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in bounds:
            assert smart_resize(h, w, 32, lo, hi) == hf_smart_resize(h, w, 32, lo, hi)


def test_bad_images_are_rejected(tiny_ckpt):
    cfg = _cfg(tiny_ckpt)
    with pytest.raises(InvalidRequestError, match="aspect ratio"):
        preprocess_image(np.zeros((1, 300, 3), dtype=np.uint8), cfg)
    with pytest.raises(InvalidRequestError, match="uint8"):
        preprocess_image(np.zeros((8, 8, 3), dtype=np.float32), cfg)
    with pytest.raises(InvalidRequestError):
        preprocess_image("not an image", cfg)


# --------------------------------------------------------------------------------------------------
# Video frames
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_frames", [1, 4, 5])
def test_video_patchify_equals_transformers(any_tiny_ckpt, num_frames):
    cfg = _cfg(any_tiny_ckpt)
    frames = torch.randn(num_frames, 3, 64, 96, generator=torch.Generator().manual_seed(num_frames))
    ref, ref_grid = hf_patchify(frames, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    ours, grid = patchify(frames, cfg)
    assert torch.equal(ours, ref) and grid == ref_grid
    assert grid[0] == (num_frames + 1) // 2  # odd counts padded with the last frame


def test_still_video_matches_the_image_path(tiny_ckpt):
    """Frames are resized with torch's antialiased bicubic on uint8 (torchvision's CPU path), images with Pillow's
    bicubic: the same filter, so a two-frame still video gives the image's patches up to ±2 levels of rounding."""
    cfg = _cfg(tiny_ckpt)
    cfg = dataclasses.replace(cfg, video_min_pixels=cfg.min_pixels, video_max_pixels=cfg.max_pixels)
    rng = np.random.default_rng(0)
    for h, w in [(80, 96), (61, 97), (400, 500), (130, 70)]:
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        video, grid = preprocess_video(np.stack([frame, frame]), cfg)
        image, image_grid = preprocess_image(frame, cfg)
        assert grid == image_grid
        diff = (video - image).abs()
        assert diff.max().item() <= 2.5 / 255 / cfg.image_std[0]
        assert (diff > 1e-5).float().mean().item() < 0.02


def test_video_frame_size_and_layouts(tiny_ckpt):
    cfg = _cfg(tiny_ckpt)
    # Qwen3OmniMoeProcessor's video bounds are 128·32² … 768·32² pixels regardless of the image bounds.
    assert video_frame_size(8, 240, 320, cfg) == (320, 448)  # scaled up to ≥ 131072 pixels
    assert video_frame_size(8, 1080, 1920, cfg) == (640, 1152)
    # qwen-vl-utils' total budget: 0.9·max_video_tokens·32² pixels shared by the frame pairs
    capped = dataclasses.replace(cfg, cap_pixels_per_frame=True, max_video_tokens=20000)
    budget = max(min(cfg.video_max_pixels, int(20000 * 32 * 32 * 0.9) * 2 // 64), int(cfg.video_min_pixels * 1.05))
    h, w = video_frame_size(64, 1080, 1920, capped)
    assert h * w <= budget < cfg.video_max_pixels
    # channels-last arrays, channels-first tensors and lists of Pillow frames give the same patches
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (3, 120, 160, 3), dtype=np.uint8)
    a, ga = preprocess_videos([frames], cfg)
    b, gb = preprocess_videos([torch.from_numpy(frames).permute(0, 3, 1, 2)], cfg)
    c, gc = preprocess_videos([[Image.fromarray(f) for f in frames]], cfg)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(ga, gb) and torch.equal(ga, gc)
    assert ga.tolist() == [[2, 20, 28]]
    with pytest.raises(InvalidRequestError):
        preprocess_video(np.zeros((2, 8, 8, 3), dtype=np.float32), cfg)
