"""What every stage replica does the same way: pick its device and dtype, bound its CPU threads, load only its
own weights, and describe what it holds (for `/health` and the tests)."""

from __future__ import annotations

import logging

import ray
import torch
from torch import nn

from deployments.settings import ServiceSettings

logger = logging.getLogger("omniray.stage")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stage_device(settings: ServiceSettings) -> torch.device:
    """cuda when asked for, or when Ray gave this replica a GPU; else cpu."""
    if settings.device is not None:
        return torch.device(settings.device)
    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


def stage_dtype(settings: ServiceSettings, device: torch.device) -> torch.dtype:
    if settings.dtype is not None:
        return _DTYPES[settings.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def configure_torch(settings: ServiceSettings) -> None:
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    torch.set_grad_enabled(False)


def describe(stage: str, modules: dict[str, nn.Module], hub_prefixes: tuple[str, ...]) -> dict:
    """What a replica holds: its hub prefixes and the number of weight elements (parameters and persistent
    buffers) of each module, so a test can check them against the checkpoint's index."""
    elements = 0
    for module in modules.values():
        elements += sum(t.numel() for t in module.state_dict().values())
    return {"stage": stage, "hub_prefixes": list(hub_prefixes), "weight_elements": elements}
