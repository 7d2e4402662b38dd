"""Our grouped MoE block (`stages.layers.MoE`) vs transformers' sparse MoE blocks on the same weights.

Shapes are the real model's (`bench/data/qwen3_omni_30b_a3b_widths.json`): the thinker's block (H 2048, 128
experts of I 768, top-8) and the talker's (H 1024, 128 experts of I 384, top-6, plus a sigmoid-gated shared expert
of 768). transformers' block is built on meta and handed our parameter tensors (`load_state_dict(assign=True)`),
so both read the very same memory. It is timed with each experts implementation asked for (`eager`: a Python
loop over the hit experts; `grouped_mm`: sort + `torch.nn.functional.grouped_mm`, its default where available;
`batched_mm`: gathers each token's expert weights, memory ∝ tokens·top-k, so only small token counts).

    python -m bench.bench_moe                                  # CPU fp32, 1/16/256 tokens
    python -m bench.bench_moe --device cuda --tokens 1,32,512,4096
"""

from __future__ import annotations

import math

import torch

from bench import common
from stages.layers import MoE

BATCHED_MM_MAX_TOKENS = 64  # batched_mm materialises tokens·top-k expert weight copies


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--blocks", default="thinker,talker", help="comma list of thinker, talker")
    p.add_argument("--tokens", default=None, help="comma list of token counts (default CPU 1,16,256; CUDA 1,32,512,4096)")
    p.add_argument("--experts", type=int, default=None, help="scale the expert count down (default: real, 128)")
    p.add_argument("--hf-experts", default="eager,grouped_mm", help="transformers experts implementations to time")
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)
    default_tokens = "1,32,512,4096" if device.type == "cuda" else "1,16,256"
    tokens = [int(t) for t in (args.tokens or default_tokens).split(",")]
    impls = args.hf_experts.split(",")

    results = []
    for block in args.blocks.split(","):
        ours, hf, hidden = build_pair(block, args.experts, dtype, device, args.seed)
        for n in tokens:
            x = torch.randn(1, n, hidden, generator=torch.Generator().manual_seed(args.seed + n)).to(device, dtype)
            with torch.inference_mode():
                want = ours(x)
            for impl in impls:
                if impl == "batched_mm" and n > BATCHED_MM_MAX_TOKENS:
                    continue
                hf.experts.config._experts_implementation = impl
                ours_t, hf_t = common.time_pair([lambda: ours(x), lambda: hf(x)], device, args.warmup, args.repeats)
                with torch.inference_mode():
                    diff = common.max_abs_diff(hf(x), want)
                results.append(common.Result(
                    f"{block} {n} tok vs {impl}", ours_t, hf_t,
                    {"tokens": n, "hf_experts": impl, "max_abs_diff": diff,
                     "ours_tok_per_s": round(n / ours_t.median, 1)},
                ))
                print(f"{results[-1].case}: ours {ours_t.median * 1e3:.2f} ms, transformers "
                      f"{hf_t.median * 1e3:.2f} ms, max |diff| {diff:.2g}", flush=True)
        del ours, hf

    settings = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "experts": args.experts or 128,
                "warmup": args.warmup, "repeats": args.repeats}
    common.report("bench_moe", args, settings, results, ["max_abs_diff", "ours_tok_per_s"])


def build_pair(block: str, experts: int | None, dtype: torch.dtype, device: torch.device, seed: int):
    """(ours, transformers' block, hidden size) sharing one set of unit-scale random weights."""
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling

    raw = common.full_width_config(None)
    thinker_text, talker_text = raw["thinker_config"]["text_config"], raw["talker_config"]["text_config"]
    if experts is not None:
        thinker_text["num_experts"] = talker_text["num_local_experts"] = experts
    hf_config = Qwen3OmniMoeConfig(**raw)
    if block == "thinker":
        text = hf_config.thinker_config.text_config
        shared = None
        hf_class = hf_modeling.Qwen3OmniMoeThinkerTextSparseMoeBlock
    elif block == "talker":
        text = hf_config.talker_config.text_config
        shared = text.shared_expert_intermediate_size
        hf_class = hf_modeling.Qwen3OmniMoeTalkerTextSparseMoeBlock
    else:
        raise SystemExit(f"unknown block {block!r}: thinker or talker")
    with torch.device(device):
        ours = MoE(text.hidden_size, text.moe_intermediate_size, text.num_experts, text.num_experts_per_tok,
                   text.norm_topk_prob, shared).to(dtype).eval()
    unit_scale_(ours, seed)
    with torch.device("meta"):
        hf = hf_class(text).eval()
    hf.load_state_dict(unfused_state_dict(ours), strict=True, assign=True)  # the same tensors, not copies
    return ours, hf, text.hidden_size


def unfused_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with each fused projection (the shared expert's gate/up) as its parts, the hub's names
    transformers' block has: views of the fused parameter's rows, so both blocks still read the same memory."""
    from common.checkpoint import fused_parts

    state = module.state_dict()
    parts = fused_parts(module)
    for name, part in parts.items():
        start, end = part.rows
        state[name] = state[part.param][start:end]
    for param in {part.param for part in parts.values()}:
        del state[param]
    return state


@torch.no_grad()
def unit_scale_(module: torch.nn.Module, seed: int) -> None:
    """Every weight ~ N(0, 1/fan_in), drawn on the module's device (fp32 draws on CPU of 600 M values are slow)."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for param in module.parameters():
        fan_in = param.shape[-1]
        param.copy_(torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
                    .mul_(1 / math.sqrt(fan_in)))


if __name__ == "__main__":
    main()
