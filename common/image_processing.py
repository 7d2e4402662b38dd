"""Image and video preprocessing for the vision encoder, as transformers' Qwen2-VL processors do it.

Images (transformers' PIL backend): RGB (transparency composited on white) → `smart_resize` to multiples of
patch·merge within [min_pixels, max_pixels] → Pillow bicubic resize on uint8 → ×rescale_factor (in float64, then
float32) → (x − mean) / std → patches. Video frames (transformers' torchvision backend, CPU): the same size rule with
the video pixel bounds, `interpolate(bicubic, antialias=True)` on uint8 frames (what torchvision runs on CPU), then
(x − mean·255) / (std·255) in float32, an odd frame count padded by repeating the last frame, then patches.

Patches come in merge-block order: rows ordered (t, block row, block column, row in block, column in block), each
row a vector (C, temporal, py, px) of length C·temporal·P·P; an image is one temporal group whose two frames are the
same picture. Shapes: F frames, C channels, H/W pixels, P patch size, m merge size, N patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import InvalidRequestError, OmniError

# Qwen3OmniMoeProcessor's class-level video size (it overrides the image processor's bounds for videos).
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32
# Pillow's resampling filter ids (transformers' PILImageResampling)
_PIL_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX,
                 5: Image.HAMMING}
_TORCH_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class VisionProcessorConfig:
    """The image-processor fields of preprocessor_config.json, plus the video bounds."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    resample: int  # PIL filter id; 3 = bicubic
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS
    # qwen-vl-utils' total-video budget: each frame also gets at most a share of `max_video_tokens` tokens' pixels
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "VisionProcessorConfig":
        size = d.get("size") or {}
        min_pixels = d.get("min_pixels", size.get("shortest_edge"))
        max_pixels = d.get("max_pixels", size.get("longest_edge"))
        cfg = cls(patch_size=int(d["patch_size"]), temporal_patch_size=int(d["temporal_patch_size"]),
                  merge_size=int(d["merge_size"]), min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                  image_mean=tuple(float(x) for x in d["image_mean"]),
                  image_std=tuple(float(x) for x in d["image_std"]),
                  rescale_factor=float(d["rescale_factor"]), resample=int(d.get("resample", 3)))
        return cls(**{**cfg.__dict__, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (one merge block of patches)."""
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Sides rounded to multiples of `factor`, area scaled into [min_pixels, max_pixels], aspect kept."""
    if min(height, width) <= 0:
        raise InvalidRequestError(f"image has no pixels ({height}×{width})")
    if max(height, width) / min(height, width) > 200:
        raise InvalidRequestError(
            f"image aspect ratio must be below 200, got {max(height, width) / min(height, width):.1f} "
            f"({height}×{width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: torch.Tensor, cfg: VisionProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`[F, C, H, W]` float → (`[t·h·w, C·T·P·P]` in merge-block order, grid (t, h, w)); F is padded to a multiple
    of the temporal patch size by repeating the last frame."""
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pad := -frames.shape[0] % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    n, c, height, width = frames.shape
    gt, gh, gw = n // tp, height // p, width // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # (t, T, C, bh, mh, py, bw, mw, px) -> (t, bh, bw, mh, mw, C, T, py, px)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def to_rgb(image) -> Image.Image:
    """A Pillow RGB image from a Pillow image (any mode) or a uint8 array `[H, W]`, `[H, W, C]` or `[C, H, W]`."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InvalidRequestError(f"image arrays must be uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # channels first -> last
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise InvalidRequestError(f"unsupported image array shape {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InvalidRequestError(f"unsupported image type {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def image_grid(height: int, width: int, cfg: VisionProcessorConfig) -> tuple[int, int, int]:
    """(1, h, w) patches for an image of this size (before merging: h·w/m² tokens)."""
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, rh // cfg.patch_size, rw // cfg.patch_size


def preprocess_image(image, cfg: VisionProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image → (`[h·w, C·T·P·P]` float32, grid (1, h, w))."""
    rgb = to_rgb(image)
    rh, rw = smart_resize(rgb.height, rgb.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(rgb.resize((rw, rh), resample=_PIL_RESAMPLE[cfg.resample]))  # [H, W, C] uint8
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    x = np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))  # [C, H, W]
    frame = torch.from_numpy(x)[None]  # [1, C, H, W]
    return patchify(frame.expand(cfg.temporal_patch_size, -1, -1, -1), cfg)


def preprocess_images(images: list, cfg: VisionProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images → (`pixel_values` [N, C·T·P·P] float32, `image_grid_thw` [n, 3] int64)."""
    patches, grids = zip(*(_naming_item("image", i, preprocess_image, im, cfg) for i, im in enumerate(images)))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.int64)


def _naming_item(kind: str, index: int, preprocess, *args):
    """`preprocess(*args)`, with an error tagged by the item it is about (see `OmniError.item`)."""
    try:
        return preprocess(*args)
    except OmniError as exc:
        exc.item = exc.item or (kind, index)
        raise


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------
def frames_to_tensor(frames) -> torch.Tensor:
    """uint8 frames `[F, H, W, C]` or `[F, C, H, W]` (array, tensor or list of Pillow images) → `[F, 3, H, W]`."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(to_rgb(f)) for f in frames])
    x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise InvalidRequestError(f"video frames must be uint8 [F, H, W, C] or [F, C, H, W], got {tuple(x.shape)} "
                                  f"{x.dtype}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3 or x.shape[0] == 0:
        raise InvalidRequestError(f"video frames must be RGB and at least one, got shape {tuple(x.shape)}")
    return x.contiguous()


def video_frame_size(num_frames: int, height: int, width: int, cfg: VisionProcessorConfig) -> tuple[int, int]:
    """Resized frame size (all frames of a video share it)."""
    max_pixels = cfg.video_max_pixels
    if cfg.cap_pixels_per_frame:
        total_pixels = int(cfg.max_video_tokens * cfg.factor * cfg.factor * 0.9)
        max_pixels = max(min(max_pixels, total_pixels * cfg.temporal_patch_size // num_frames),
                         int(cfg.video_min_pixels * 1.05))
    return smart_resize(height, width, cfg.factor, cfg.video_min_pixels, max_pixels)


def preprocess_video(frames, cfg: VisionProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One video's frames → (`[t·h·w, C·T·P·P]` float32, grid (t, h, w))."""
    x = frames_to_tensor(frames)  # [F, 3, H, W] uint8
    rh, rw = video_frame_size(x.shape[0], x.shape[2], x.shape[3], cfg)
    mode = _TORCH_RESAMPLE.get(cfg.resample, "bicubic")
    x = F.interpolate(x, size=(rh, rw), mode=mode, antialias=mode in ("bilinear", "bicubic"))
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)  # rescale folded into mean/std
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    x = (x.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    return patchify(x, cfg)


def preprocess_videos(videos: list, cfg: VisionProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos → (`pixel_values_videos` [N, C·T·P·P] float32, `video_grid_thw` [n, 3] int64)."""
    patches, grids = zip(*(_naming_item("video", i, preprocess_video, v, cfg) for i, v in enumerate(videos)))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.int64)
