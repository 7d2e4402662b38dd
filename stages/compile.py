"""Compiling the engines' fixed-shape steps: whether, how, and for which batch sizes.

An engine's decode steps run on a fixed set of batch-size buckets (a step of n rows runs the rows of the smallest
bucket ≥ n), so a compiled step meets a handful of shapes, each compiled once (`torch.compile` with static shapes;
on CUDA with CUDA graphs, `mode="reduce-overhead"`). Compiled code is cached on disk by inductor's FX graph cache
(in its cache folder, /tmp/torchinductor_<user> unless TORCHINDUCTOR_CACHE_DIR says otherwise), so a restarted
replica on the same machine loads its steps instead of compiling them again (seconds instead of minutes on a CPU).

The setting (`ServiceSettings.compile`, `OmniModel.from_pretrained(compile=...)`):
- `on`: compile; an engine compiles every bucket before it takes requests (its warm-up);
- `off`: run the same steps eagerly;
- `auto`: on for CUDA in bfloat16, where launch overhead is most of a decode step and CUDA graphs remove it; off on
  CPU, where compiling every bucket takes minutes on a few cores: a CPU replica is for development and tests (set
  `on` for a long-running CPU service: its steps then run 2-3× faster).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

CompileMode = Literal["auto", "on", "off"]
COMPILE_MODES = ("auto", "on", "off")


def compile_enabled(mode: CompileMode, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the engines compile their steps. On CUDA only in bfloat16: the grouped expert matmul has a CUDA kernel
    for bfloat16 only, and the per-expert loop other dtypes take reads group sizes back to the host, which a CUDA
    graph cannot hold."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    graphable = device.type != "cuda" or dtype == torch.bfloat16
    if mode == "on" and not graphable:
        raise ValueError(f"compiled steps on CUDA need bfloat16 weights, not {dtype}")
    return mode == "on" or (mode == "auto" and device.type == "cuda" and graphable)


_COMPILED: dict[tuple[Callable, str], Callable] = {}
# graphs one compiled step may hold: one per batch bucket, attention span and engine buffer shape (dynamo's default,
# 8, is fewer than a replica's buckets × spans, and past it dynamo runs the step eagerly without saying so again)
RECOMPILE_LIMIT = 64
_WARMED: set[tuple] = set()
# Inductor on a CPU: a decode step's kernels are short, so calling them from C++ instead of Python (`cpp_wrapper`) is
# 1.5× faster; and a matmul of one row (every projection of a batch-1 step) becomes a fused multiply-reduce instead of
# a BLAS call (`decompose_mm_pass`): a greedy code-predictor frame of the small config took 1.0-1.8 ms of CPU against
# 2.2-2.5 ms without it, same codes. Both are in inductor's cache key: changing them compiles every step again.
CPU_OPTIONS = {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}


def compile_step(fn: Callable, device: torch.device) -> Callable:
    """`fn` (a module-level function: its modules and buffers are arguments) compiled for static shapes (one graph per
    input shape it meets), with CUDA graphs on CUDA. One compiled callable per function and device type, shared by
    every engine: a new `torch.compile` wrapper would compile its graphs again."""
    key = (fn, device.type)
    if key not in _COMPILED:
        torch._inductor.config.fx_graph_cache = True
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        if device.type == "cuda":
            _COMPILED[key] = torch.compile(fn, dynamic=False, mode="reduce-overhead")
        else:
            _COMPILED[key] = torch.compile(fn, dynamic=False, options=CPU_OPTIONS)
    return _COMPILED[key]


def needs_warm_up(key: tuple) -> bool:
    """Whether an engine's warm-up of `key` (its step function, module and buffer shapes) is still to run in this
    process: True the first time only. Compiled graphs are kept per function and input shape, so an engine built
    again on the same shapes (`OmniModel.generate` builds its engines per call) finds its graphs compiled."""
    if key in _WARMED:
        return False
    _WARMED.add(key)
    return True


def static_buffers(tensors: list[torch.Tensor]) -> None:
    """Tell the compiler these buffers (KV caches, with their validity and lengths, which a step moves on) live at one
    address for good: a compiled step that writes them in place can then be replayed as a CUDA graph (cudagraph trees
    skip graphs that mutate inputs of changing address)."""
    for tensor in tensors:
        torch._dynamo.mark_static_address(tensor)


def batch_buckets(max_rows: int) -> list[int]:
    """The batch sizes a step runs at: powers of two below `max_rows`, and `max_rows`."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return buckets + [max_rows]


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `rows` rows."""
    return next(b for b in buckets if b >= rows)
