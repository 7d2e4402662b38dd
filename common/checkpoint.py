"""Checkpoint files: find them (local folder or hub id) and load one stage's weights into its module.

A checkpoint is the hub layout: config.json, tokenizer/processor files and safetensors weights, either sharded
(`model.safetensors.index.json` + shards) or a single `model.safetensors`. Each stage reads only its own
tensor-name prefixes (`STAGE_PREFIXES`), so a stage process maps, and on the hub downloads, only its shards.

Loading contract (see docs/internals.md, "Weights"):
- The stage module is built on the meta device (`with built_on_meta(): module = Stage(cfg)`), so building it
  allocates and computes nothing; `load_stage_weights` assigns the file tensors (converted to `dtype`, on
  `device`), so peak memory is about the stage's weights plus one tensor.
- Parameter names are the hub names with the stage's prefix replaced (`prefix_map`), except MoE experts, which
  we hold stacked (`STACKED_EXPERTS`), and projections of one input that a module holds fused
  (`stages.layers.FusedLinear`: e.g. `self_attn.qkv_proj.weight` is the rows of the hub's `self_attn.q_proj.weight`,
  `k_proj`, `v_proj`), so checkpoints stay as the hub has them.
- Non-persistent buffers (rotary `inv_freq`, sinusoid tables, code offsets) are not in the files. After the
  weights are assigned they are allocated on `device` and every module that owns one must define
  `reset_buffers()`, which fills them; it is called once per module, parents before children.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from common.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# hub prefix -> module prefix, per stage (docs/internals.md).
STAGE_PREFIXES: dict[str, dict[str, str]] = {
    "audio_encoder": {"thinker.audio_tower.": ""},
    "vision_encoder": {"thinker.visual.": ""},
    "thinker": {"thinker.model.": "model.", "thinker.lm_head.": "lm_head."},
    "talker": {"talker.": ""},
    "code2wav": {"code2wav.": ""},
}
# hub tensor the talker reads beyond `talker.`: three rows (tts bos/eos/pad) of the thinker's embedding table
THINKER_EMBEDDING = "thinker.model.embed_tokens."

# Everything but the weights that a serving process reads from a hub checkpoint.
METADATA_FILES = [
    "config.json",
    "generation_config.json",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "*.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
]

# Our stacked MoE expert parameter -> the hub's per-expert `…experts.{e}.<proj>.weight` tensors it holds,
# concatenated along rows in this order:
#   experts.gate_up_proj [E, 2I, H] = cat(gate_proj [I, H], up_proj [I, H])   (gate rows first)
#   experts.down_proj    [E, H, I]  = down_proj [H, I]
STACKED_EXPERTS: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
# hub projection -> (stacked parameter, part index)
_HUB_PROJ = {proj: (stacked, part) for stacked, projs in STACKED_EXPERTS.items() for part, proj in enumerate(projs)}
_HUB_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_OUR_STACKED = re.compile(r"^(?P<experts>.+\.experts)\.(?P<stacked>\w+)$")


# ----------------------------------------------------------------------------------------------------------
# Finding the files


def resolve_checkpoint(ref: str | Path, prefixes: Iterable[str] | None = None, revision: str | None = None) -> Path:
    """The folder of checkpoint `ref`: a local folder as is, or a hub id fetched into the hub cache.

    From the hub only the metadata files and the shards holding tensors under `prefixes` (all shards when
    None) are fetched. Both fetches name the same commit, so they land in the same snapshot folder.
    """
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if str(ref).startswith(("/", ".", "~")) or str(ref).count("/") > 1:  # a path, not an `owner/name` hub id
        raise CheckpointError(f"checkpoint folder {ref} does not exist")
    snapshot = _download(str(ref), METADATA_FILES, revision)
    if (snapshot / INDEX_FILE).is_file():
        shards = shards_for_prefixes(weight_map(snapshot), prefixes)
    else:
        shards = [SINGLE_FILE]
    return _download(str(ref), shards, snapshot.name)  # the snapshot folder is named by its commit


def _download(repo_id: str, allow_patterns: list[str], revision: str | None) -> Path:
    from huggingface_hub import snapshot_download  # imported here: only hub ids need it

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns))
    except Exception as e:  # network, auth, missing repo: all mean "this checkpoint cannot be had"
        raise CheckpointError(f"cannot fetch {repo_id} from the hub: {type(e).__name__}: {e}") from e


def weight_map(ckpt_dir: str | Path) -> dict[str, str]:
    """Every tensor name in the checkpoint -> the file (relative to `ckpt_dir`) that holds it."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index: {e}") from None
    single = ckpt_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {ckpt_dir}")


def shards_for_prefixes(names_to_files: dict[str, str], prefixes: Iterable[str] | None) -> list[str]:
    """The files holding any tensor whose name starts with one of `prefixes` (all files when None)."""
    prefixes = None if prefixes is None else tuple(prefixes)
    return sorted({file for name, file in names_to_files.items() if prefixes is None or name.startswith(prefixes)})


# ----------------------------------------------------------------------------------------------------------
# Name mapping


@dataclass(frozen=True)
class _Source:
    """One file tensor and where it goes: our parameter `name`, for stacked experts its (expert, part), for a fused
    projection its output `rows` [start, end)."""

    hub_name: str
    file: str
    name: str
    expert: int | None = None
    part: int | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class _FusedPart:
    param: str  # our fused parameter, e.g. `layers.0.self_attn.qkv_proj.weight`
    rows: tuple[int, int]  # the part's output rows in it


def fused_parts(module: nn.Module) -> dict[str, _FusedPart]:
    """The module's fused projections, unfused: the name a part has in the checkpoint (with the stage's module
    prefix, e.g. `layers.0.self_attn.k_proj.bias`) -> where it lives in our parameter."""
    out = {}
    for path, sub in module.named_modules():
        parts = getattr(sub, "parts", None)
        if not isinstance(sub, nn.Linear) or not isinstance(parts, dict):
            continue
        parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
        for kind in ("weight", "bias") if sub.bias is not None else ("weight",):
            start = 0
            for hub_proj, rows in parts.items():
                out[f"{parent}{hub_proj}.{kind}"] = _FusedPart(f"{path}.{kind}", (start, start + rows))
                start += rows
    return out


def fuse_projections(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict that holds the hub's separate projections (as transformers' modules do) -> one for `module`,
    whose fused projections get the parts' rows concatenated; every other entry is passed through."""
    out = dict(state_dict)
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for part_name, part in fused_parts(module).items():
        if part_name in out:
            pieces[part.param].append((part.rows[0], out.pop(part_name)))
    for param, rows in pieces.items():
        out[param] = torch.cat([tensor for _, tensor in sorted(rows, key=lambda r: r[0])])
    return out


def _to_ours(
    hub_name: str, prefix_map: dict[str, str], fused: dict[str, _FusedPart]
) -> tuple[str, int | None, int | None, tuple[int, int] | None] | None:
    """Hub tensor name -> (our parameter, expert, part, rows), or None when outside the stage's prefixes."""
    for hub_prefix, our_prefix in sorted(prefix_map.items(), key=lambda kv: -len(kv[0])):
        if hub_name.startswith(hub_prefix):
            name = our_prefix + hub_name[len(hub_prefix):]
            break
    else:
        return None
    if name in fused:
        return fused[name].param, None, None, fused[name].rows
    match = _HUB_EXPERT.match(name)
    if match and match["proj"] in _HUB_PROJ:
        stacked, part = _HUB_PROJ[match["proj"]]
        return f"{match['experts']}.{stacked}", int(match["expert"]), part, None
    return name, None, None, None


def _is_stacked(name: str) -> bool:
    match = _OUR_STACKED.match(name)
    return match is not None and match["stacked"] in STACKED_EXPERTS


def _hub_prefixed(name: str, prefix_map: dict[str, str]) -> str:
    """Our parameter name with the stage's module prefix replaced by its hub prefix."""
    for hub_prefix, our_prefix in sorted(prefix_map.items(), key=lambda kv: -len(kv[1])):
        if name.startswith(our_prefix):
            return hub_prefix + name[len(our_prefix):]
    raise CheckpointError(f"{name} is under none of the module prefixes {sorted(prefix_map.values())}")


def hub_names(name: str, prefix_map: dict[str, str], num_experts: int | None = None) -> list[str]:
    """The hub tensor names that make up our parameter `name` (the inverse of loading's mapping).

    A stacked expert parameter needs `num_experts`; its names come expert by expert, parts in row order.
    """
    hub = _hub_prefixed(name, prefix_map)
    if not _is_stacked(hub):
        return [hub]
    if num_experts is None:
        raise ValueError(f"{name} is a stacked expert parameter: pass num_experts")
    match = _OUR_STACKED.match(hub)
    projs = STACKED_EXPERTS[match["stacked"]]
    return [f"{match['experts']}.{e}.{proj}.weight" for e in range(num_experts) for proj in projs]


def to_hub_state_dict(module: nn.Module, prefix_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """A loaded stage module -> hub-named tensors (experts unstacked, fused projections split), each its own
    contiguous copy, ready for `safetensors.torch.save_file`."""
    out = {}
    state_dict = module.state_dict()
    fused = fused_parts(module)
    for part_name, part in fused.items():
        start, end = part.rows
        out[_hub_prefixed(part_name, prefix_map)] = state_dict[part.param][start:end].detach().clone()
    fused_params = {part.param for part in fused.values()}
    for name, tensor in state_dict.items():
        if name in fused_params:
            continue
        if not _is_stacked(name):
            out[_hub_prefixed(name, prefix_map)] = tensor.detach().clone()
            continue
        parts = len(STACKED_EXPERTS[name.rsplit(".", 1)[1]])
        rows = tensor.shape[1] // parts  # tensor: [E, parts·rows, cols]
        for i, hub in enumerate(hub_names(name, prefix_map, num_experts=tensor.shape[0])):
            expert, part = divmod(i, parts)
            out[hub] = tensor[expert, part * rows : (part + 1) * rows].detach().clone()
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading


@contextmanager
def built_on_meta():
    """Modules built in this block have their parameters and buffers on the meta device, and nothing is computed
    there: `torch.nn`'s initialisers are skipped on meta tensors, and our modules compute their buffers only off meta
    (`reset_buffers`, which the loader calls once the buffers are on their device). Not for speed of the meta ops
    themselves: the first meta op of a process that computes anything (an initialiser's fill, a rotary table's
    `arange`, a division) runs torch's Python meta kernels, which import torch._dynamo and sympy, about 2.5 s of CPU
    at every start of a process that loads a stage (a replica, a batch job's actor)."""
    with torch.device("meta"), _InitialisersSkippedOnMeta():
        yield


class _InitialisersSkippedOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def load_stage_weights(
    module: nn.Module,
    ckpt_dir: str | Path,
    prefix_map: dict[str, str],
    dtype: torch.dtype,
    device: str | torch.device,
) -> nn.Module:
    """Load the tensors under `prefix_map`'s hub prefixes into `module` (usually built on meta).

    Floating-point tensors are converted to `dtype`; everything lands on `device`. Missing, unexpected or
    mis-shaped tensors raise `CheckpointError` listing them. Returns `module`.
    """
    ckpt_dir = Path(ckpt_dir)
    device = torch.device(device)
    expected = module.state_dict(keep_vars=True)  # name -> tensor (on meta: shape and dtype only)
    fused = fused_parts(module)
    sources = _plan(weight_map(ckpt_dir), prefix_map, fused)
    _check_names(sources, expected, prefix_map, fused)
    tensors = _read(sources, expected, ckpt_dir, dtype, device)
    module.load_state_dict(tensors, strict=True, assign=True)
    materialise_buffers(module, device)
    return module


def _plan(
    names_to_files: dict[str, str], prefix_map: dict[str, str], fused: dict[str, _FusedPart]
) -> dict[str, list[_Source]]:
    """Our parameter name -> the file tensors it is made of."""
    sources: dict[str, list[_Source]] = defaultdict(list)
    for hub_name, file in names_to_files.items():
        ours = _to_ours(hub_name, prefix_map, fused)
        if ours is not None:
            name, expert, part, rows = ours
            sources[name].append(_Source(hub_name, file, name, expert, part, rows))
    return dict(sources)


def _check_names(
    sources: dict[str, list[_Source]], expected: dict[str, torch.Tensor], prefix_map, fused: dict[str, _FusedPart]
) -> None:
    missing, unexpected = [], []
    parts_of: dict[str, list[str]] = defaultdict(list)  # our fused parameter -> its parts' hub names
    for part_name, part in fused.items():
        parts_of[part.param].append(_hub_prefixed(part_name, prefix_map))
    for name, group in sources.items():
        if name not in expected:
            unexpected += [s.hub_name for s in group]
    for name, tensor in expected.items():
        if name in parts_of:
            wanted = parts_of[name]
        else:
            wanted = hub_names(name, prefix_map, num_experts=tensor.shape[0] if _is_stacked(name) else None)
        have = {s.hub_name for s in sources.get(name, [])}
        missing += [hub for hub in wanted if hub not in have]
        unexpected += have - set(wanted)  # e.g. an expert index beyond the module's E
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the module for prefixes {sorted(prefix_map)}:"
            f"{_listing('missing', missing)}{_listing('unexpected', sorted(unexpected))}"
        )


def _listing(what: str, names: list[str], limit: int = 20) -> str:
    if not names:
        return ""
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {what} ({len(names)}): " + ", ".join(names[:limit]) + more


def _read(sources, expected, ckpt_dir: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Read every source tensor, one file open at a time, into tensors shaped like `expected`."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[_Source]] = defaultdict(list)
    for group in sources.values():
        for s in group:
            by_file[s.file].append(s)
    bad_shapes = []
    for file, group in sorted(by_file.items()):
        if not (ckpt_dir / file).is_file():
            raise CheckpointError(f"{ckpt_dir / file} holds {group[0].hub_name} (and {len(group) - 1} more) but is missing")
        with safe_open(ckpt_dir / file, framework="pt") as f:
            for s in group:
                target = expected[s.name]
                tensor = f.get_tensor(s.hub_name)
                to_dtype = dtype if tensor.is_floating_point() else tensor.dtype
                if s.rows is not None:  # one projection's rows of a fused one
                    start, end = s.rows
                    if tensor.shape != (end - start, *target.shape[1:]):
                        bad_shapes.append(f"{s.hub_name} {list(tensor.shape)} does not fit rows {start}:{end} of "
                                          f"{s.name} {list(target.shape)}")
                        continue
                    if s.name not in out:
                        out[s.name] = torch.empty(target.shape, dtype=to_dtype, device=device)
                    out[s.name][start:end].copy_(tensor)
                    continue
                if s.expert is None:
                    if tensor.shape != target.shape:
                        bad_shapes.append(f"{s.hub_name} {list(tensor.shape)} ≠ {s.name} {list(target.shape)}")
                        continue
                    out[s.name] = tensor.to(device=device, dtype=to_dtype)
                    continue
                # stacked expert: [E, parts·rows, cols]; this tensor is rows [part·rows, (part+1)·rows) of expert e
                parts = len(STACKED_EXPERTS[s.name.rsplit(".", 1)[1]])
                rows = target.shape[1] // parts
                if tensor.shape != (rows, target.shape[2]) or target.shape[1] % parts:
                    bad_shapes.append(
                        f"{s.hub_name} {list(tensor.shape)} does not fit {s.name} {list(target.shape)}"
                    )
                    continue
                if s.name not in out:
                    out[s.name] = torch.empty(target.shape, dtype=to_dtype, device=device)
                out[s.name][s.expert, s.part * rows : (s.part + 1) * rows].copy_(tensor)
    if bad_shapes:
        raise CheckpointError("tensor shapes do not match the module:" + _listing("mismatched", bad_shapes))
    return out


def materialise_buffers(module: nn.Module, device: torch.device) -> None:
    """Allocate the non-persistent buffers left on meta and let their owners fill them (`reset_buffers`)."""
    for name, sub in module.named_modules():
        meta = [b for b, t in sub.named_buffers(recurse=False) if t.is_meta]
        if not meta:
            continue
        if not hasattr(sub, "reset_buffers"):
            raise CheckpointError(
                f"{name or type(module).__name__} ({type(sub).__name__}) has buffers {meta} that are not in the "
                f"checkpoint and no reset_buffers() to compute them"
            )
        for b in meta:
            setattr(sub, b, torch.empty_like(getattr(sub, b), device=device))
    for sub in module.modules():
        if hasattr(sub, "reset_buffers"):
            sub.reset_buffers()
