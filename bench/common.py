"""What every benchmark shares: flags, the machine's description, timers, checkpoints, and result records.

A benchmark runs ours and transformers on the same weights in one process and reports, per case, both wall
times and `speedup = transformers / ours` (> 1: ours is faster). Results go to `bench/results/<name>-<stamp>.json`
and, as a dated section with the machine and the command, to `bench/RESULTS.md`.

Run benchmarks as modules from the repository root (`python -m bench.bench_moe ...`): run as a script, the
`bench/` folder would come first on `sys.path` and `import common` would find this file, not the package.

Checkpoints (`--model`):
- `tiny`, `tiny-alt`: `common.tiny.write_tiny_checkpoint` (the tests' model; timings are mostly overhead).
- `small`: the same writer's "small" shape (thinker hidden 256, 16 experts, 16 code groups): compute shows.
- `full`: the real model's widths (`bench/data/qwen3_omni_30b_a3b_widths.json`, copied from the real
  config.json) with every layer stack capped at `--layers`, random weights written in `--dtype` through the same
  writer (`common.tiny.write_checkpoint`). Meant for a GPU: `--layers 8` is 7.7 B parameters
  (the real depths: 35.3 B).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
WIDTHS_FILE = BENCH_DIR / "data" / "qwen3_omni_30b_a3b_widths.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_SHARD_BYTES = 2 * 1024**3
DEFAULT_CACHE_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "omniray-bench"  # built checkpoints, reused


# ----------------------------------------------------------------------------------------------------------
# Flags


def parser(description: str) -> argparse.ArgumentParser:
    """Flags every benchmark takes; a benchmark adds its own cases' flags."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing each case")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-record", action="store_true", help="print only: no JSON, no RESULTS.md entry")
    p.add_argument("--note", default="", help="free text stored with the result")
    return p


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["tiny", "tiny-alt", "small", "full"], default="tiny",
                   help="which random checkpoint to build (ignored with --checkpoint)")
    p.add_argument("--layers", type=int, default=8, help="--model full: cap on every layer stack (≥ 3)")
    p.add_argument("--checkpoint", type=Path, default=None, help="an existing checkpoint folder instead")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                   help="where built checkpoints are kept between runs")


def resolve_device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        # fp32 means fp32: TF32 matmuls would make the fp32 numbers incomparable with the CPU's.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device, dtype


# ----------------------------------------------------------------------------------------------------------
# Machine


def machine() -> dict:
    """CPU model, cores, library versions, CUDA device: enough to know which numbers are comparable."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_device": None,
        "git_commit": _git_commit(),
        # the CPU machine is shared: a load above its core count means the timings are contended
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda_device=props.name, cuda_memory_gib=round(props.total_memory / 1024**3, 1),
                    cuda_runtime=torch.version.cuda, cuda_capability=f"{props.major}.{props.minor}")
    return info


def machine_line(info: dict) -> str:
    gpu = f"{info['cuda_device']} ({info['cuda_memory_gib']} GiB, CUDA {info['cuda_runtime']})" \
        if info["cuda_device"] else "no CUDA device"
    return (f"{info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads); {gpu}; "
            f"torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}; "
            f"commit {info['git_commit']}; load {info['load_average_1min']}")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds: list[float]
    activation_gib: float | None = None  # CUDA: peak memory above what was allocated before the runs

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_pair(fns: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> list[Timing]:
    """Time several functions (ours, transformers') with their runs interleaved (a, b, b, a, a, b, ...), so load
    from other processes on a shared machine hits both alike. Every run is synchronised with the device on both
    sides (CUDA kernels are asynchronous: without the sync we would time the launch only)."""
    seconds: list[list[float]] = [[] for _ in fns]
    activation: list[float | None] = [None for _ in fns]
    with torch.inference_mode():
        for i, fn in enumerate(fns):
            for _ in range(warmup):
                fn()
            sync(device)
            if device.type == "cuda":  # activation memory: one run alone, above what is allocated before it
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                sync(device)
                activation[i] = round((torch.cuda.max_memory_allocated(device) - before) / 1024**3, 3)
        for rep in range(repeats):
            order = range(len(fns)) if rep % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                sync(device)
                start = time.perf_counter()
                fns[i]()
                sync(device)
                seconds[i].append(time.perf_counter() - start)
    return [Timing(s, a) for s, a in zip(seconds, activation)]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def full_width_config(layers: int | None) -> dict:
    """config.json dict of the real model's widths (token ids from the tiny tokenizer), every layer stack capped
    at `layers` (None: the real depths). Indices into the stacks (DeepStack taps, the talker's
    `accept_hidden_layer`) move in proportion, so they keep their place in the shallower stack."""
    from common.tiny import build_config, build_tokenizer

    config = build_config(build_tokenizer(), "default")
    overlay = json.loads(WIDTHS_FILE.read_text())
    overlay.pop("_comment")
    _deep_update(config, overlay)
    config["dtype"] = "bfloat16"
    if layers is not None:
        _cap_layers(config, layers)
    return config


def _deep_update(target: dict, overlay: dict) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict) and key != "speaker_id":
            _deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _cap_layers(config: dict, layers: int) -> None:
    if layers < 3:
        raise ValueError("--layers must be ≥ 3: the vision encoder needs three distinct DeepStack taps")
    thinker, talker = config["thinker_config"], config["talker_config"]
    audio, vision, text = thinker["audio_config"], thinker["vision_config"], thinker["text_config"]
    depth = vision["depth"]
    if layers < depth:
        vision["deepstack_visual_indexes"] = [i * layers // depth for i in vision["deepstack_visual_indexes"]]
        vision["depth"] = layers
    audio["encoder_layers"] = min(audio["encoder_layers"], layers)
    real_text_layers = text["num_hidden_layers"]
    text["num_hidden_layers"] = min(real_text_layers, layers)
    talker["accept_hidden_layer"] = max(1, talker["accept_hidden_layer"] * text["num_hidden_layers"] // real_text_layers)
    talker["text_config"]["num_hidden_layers"] = min(talker["text_config"]["num_hidden_layers"], layers)
    predictor = talker["code_predictor_config"]
    predictor["num_hidden_layers"] = min(predictor["num_hidden_layers"], layers)
    predictor["layer_types"] = predictor["layer_types"][: predictor["num_hidden_layers"]]
    config["code2wav_config"]["num_hidden_layers"] = min(config["code2wav_config"]["num_hidden_layers"], layers)


def build_checkpoint(args: argparse.Namespace, dtype: torch.dtype) -> Path:
    """The checkpoint folder `args` names: `--checkpoint` as is, else a random one built once into the cache."""
    from common.tiny import write_tiny_checkpoint

    if args.checkpoint is not None:
        return args.checkpoint
    if args.model in ("tiny", "tiny-alt", "small"):
        variant = {"tiny": "default", "tiny-alt": "alt", "small": "small"}[args.model]
        out = args.cache_dir / f"{args.model}-seed{args.seed}"
        if not (out / "config.json").is_file():
            write_tiny_checkpoint(out, seed=args.seed, variant=variant)
        return out
    return full_checkpoint(args.layers, dtype, args.seed, args.cache_dir)


def full_checkpoint(layers: int, dtype: torch.dtype, seed: int = 0, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The full-width random checkpoint with `layers` per stack in `dtype`, written once into `cache_dir` (minutes:
    3.5 B values at `layers` 3) and reused by later runs and the GPU tests."""
    from common.tiny import write_checkpoint

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    out = Path(cache_dir) / f"full-layers{layers}-{name}-seed{seed}"
    if not (out / "config.json").is_file():  # config.json is written last: its presence means complete
        start = time.perf_counter()
        print(f"writing the full-width checkpoint ({layers} layers, {name}) to {out} ...", flush=True)
        write_checkpoint(out, full_width_config(layers), seed=seed, dtype=dtype, shard_bytes=FULL_SHARD_BYTES)
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def checkpoint_summary(path: Path) -> dict:
    """Parameter count (from the index's byte total and the dtype) and the shape-defining fields."""
    config = json.loads((path / "config.json").read_text())
    text = config["thinker_config"]["text_config"]
    return {
        "path": str(path),
        "bytes": json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"],
        "thinker_layers": text["num_hidden_layers"], "thinker_hidden": text["hidden_size"],
        "thinker_experts": text["num_experts"], "vocab": text["vocab_size"],
    }


def generation_eos_ids(path: Path) -> list[int]:
    """The checkpoint's generation_config.json end-of-sequence ids."""
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


def load_transformers(path: Path, dtype: torch.dtype, device: torch.device):
    """transformers' Qwen3OmniMoeForConditionalGeneration on `path`, eval, with its default attention and experts
    implementations (recorded in the results), and the runtime workaround for transformers' talker crash (the talker's rope index reads
    an audio_config its config lacks)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    # loaded on the CPU, then moved: device_map needs accelerate, which omniray does not depend on
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    if model.has_talker and not hasattr(model.talker.config, "audio_config"):
        model.talker.config.audio_config = model.thinker.config.audio_config
    return model


def transformers_settings(model) -> dict:
    text = model.thinker.config.text_config
    return {"attn_implementation": text._attn_implementation, "experts_implementation": text._experts_implementation}


# ----------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    """One case: both timings (the median is reported, every run is kept) and whatever else was measured."""

    case: str
    ours: Timing
    hf: Timing | None
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return self.hf.median / self.ours.median if self.hf is not None and self.ours.median > 0 else None

    def as_dict(self) -> dict:
        return {"case": self.case, "ours_s": self.ours.median, "transformers_s": self.hf.median if self.hf else None,
                "speedup": self.speedup, "ours_runs_s": self.ours.seconds,
                "transformers_runs_s": self.hf.seconds if self.hf else None,
                "ours_activation_gib": self.ours.activation_gib,
                "transformers_activation_gib": self.hf.activation_gib if self.hf else None, **self.extra}


def format_table(results: list[Result], extra_columns: list[str]) -> str:
    head = ["case", "ours", "transformers", "speedup", *extra_columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.case, _seconds(r.ours.median), _seconds(r.hf.median if r.hf else None), f"{r.speedup:.2f}×" if r.speedup else "–"]
        cells += [_cell(r.extra.get(c)) for c in extra_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def report(name: str, args: argparse.Namespace, settings: dict, results: list[Result],
           extra_columns: list[str] = ()) -> None:
    """Print the table; unless --no-record, write the JSON and append a dated section to RESULTS.md."""
    info = machine()
    table = format_table(results, list(extra_columns))
    command = "python -m bench." + name + " " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"\n{name} — {machine_line(info)}\n{settings}\n{table}\n(speedup = transformers time / ours time)")
    if args.no_record:
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({
        "benchmark": name, "date": now.isoformat(timespec="seconds"), "command": command.strip(),
        "machine": info, "settings": settings, "note": args.note, "results": [r.as_dict() for r in results],
    }, indent=2) + "\n")
    settings_line = ", ".join(f"{k} {v}" for k, v in settings.items())
    section = (f"\n## {now:%Y-%m-%d %H:%M} UTC — {name}\n\n"
               f"- machine: {machine_line(info)}\n- command: `{command.strip()}`\n- settings: {settings_line}\n"
               + (f"- note: {args.note}\n" if args.note else "")
               + f"- raw: `bench/results/{path.name}`\n\n{table}\n")
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(RESULTS_HEADER)
    with RESULTS_MD.open("a") as f:
        f.write(section)
    print(f"recorded {path.relative_to(REPO_DIR)} and a section in bench/RESULTS.md")


RESULTS_HEADER = """# Benchmark results

Each section is one run of one benchmark: date, machine, command, and per case the median wall time of ours and of
transformers on the same weights in the same process, with `speedup = transformers / ours` (> 1: ours is faster).
The raw JSON of every run is in `bench/results/`. Numbers are only comparable within one machine line.
"""
