"""transformers' Qwen2-VL video-processor functions that are plain torch (patchify, sample_frames).

Their module imports torchvision at the top, which is not installed here; `video_processor_module()` imports it with
stub torchvision modules in place and removes both again, so nothing else in the session sees them.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from types import SimpleNamespace

_STUBS = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2", "torchvision.transforms.v2.functional"]
_MODULE = "transformers.models.qwen2_vl.video_processing_qwen2_vl"


def video_processor_module():
    import transformers  # noqa: F401  (transformers decides torchvision is absent before the stubs exist)

    saved = {name: sys.modules.get(name) for name in _STUBS + [_MODULE]}
    try:
        for name in _STUBS:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
        sys.modules.pop(_MODULE, None)
        return importlib.import_module(_MODULE)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def hf_patchify(frames, patch_size, merge_size, temporal_patch_size):
    """`Qwen2VLVideoProcessor.patchify` on one video `[F, C, H, W]` → (patches, (t, h, w))."""
    proc = video_processor_module().Qwen2VLVideoProcessor
    patches, t, h, w = proc.patchify(None, frames[None], patch_size=patch_size, merge_size=merge_size,
                                     temporal_patch_size=temporal_patch_size)
    return patches[0], (t, h, w)


def hf_sample_frames(total_frames, video_fps, fps, min_frames=4, max_frames=768, temporal_patch_size=2):
    """`Qwen2VLVideoProcessor.sample_frames` with fps sampling → frame indices."""
    proc = video_processor_module().Qwen2VLVideoProcessor
    self_like = SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=temporal_patch_size,
                                min_frames=min_frames, max_frames=max_frames)
    metadata = SimpleNamespace(total_num_frames=total_frames, fps=video_fps)
    return proc.sample_frames(self_like, metadata, fps=fps).numpy()
