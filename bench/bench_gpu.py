"""The fast-decode targets at the real widths with random weights built on the device (no checkpoint is written):

- `frame`: the code predictor's 15 greedy residual codes of one frame, at batch 1 and `--frame-batch`, ours (the
  talker engine's `FramePredictor`) against transformers' code predictor `generate` on the same weights;
  target ≤ 2 ms per frame at batch 1;
- `decode`: the thinker's decode step at batch 1 through `OmniModel.generate`: the median time between the tokens of
  the second half of a reply of `--decode-tokens` tokens (the first steps of a call may also record CUDA graphs: an
  engine's thread records its own), against the time to read the step's active weights once at the copy bandwidth
  measured here; target ≥ 60 % of that bound. No transformers column: `bench_stages --model full` times its thinker
  on a written checkpoint;
- `speech`: `--replies` spoken replies at once through `OmniModel.generate` (thinker, talker with code predictor,
  Code2Wav), against the seconds of speech each reply holds; target: the speaking part (the wall time less that of
  the same replies without speech) faster than real time at 16 replies. No transformers column: transformers
  generates one reply at a time.

Every stack has `--layers` layers (the vision encoder keeps three DeepStack taps). Weights are drawn on the device,
unit-scale by role (as the checkpoints the tests write); the stages are built and loaded the way a checkpoint's
are, so the engines, buckets and compiled steps are the service's.

    python -m bench.bench_gpu --device cuda --layers 3                    # H100/H200: bf16, compiled
    python -m bench.bench_gpu --device cpu --widths small --replies 2     # the script's own check on a CPU
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from common.checkpoint import STACKED_EXPERTS, STAGE_PREFIXES, built_on_meta, hub_names, materialise_buffers
from common.config import load_config, load_generation_config
from common.processor import OmniProcessor
from common.tokenizer import OmniTokenizer
from stages.audio_encoder import AudioEncoder
from stages.code2wav import Code2Wav
from stages.omni import OmniModel
from stages.talker import Talker
from stages.thinker import ThinkerLM
from stages.vision_encoder import VisionEncoder

CASES = ("frame", "decode", "speech")
FRAME_SECONDS = 0.08  # one codec frame: 1920 samples at 24 kHz


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--widths", choices=["full", "small"], default="full",
                   help="full: the real model's widths; small: the small test config (a CPU check of this script)")
    p.add_argument("--layers", type=int, default=3, help="--widths full: layers per stack (≥ 3)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--compile", choices=["on", "off"], default="on", help="the engines' compiled steps")
    p.add_argument("--frame-batch", default="1,16", help="comma list: rows of the code-predictor frame case")
    p.add_argument("--prompt-tokens", type=int, default=128, help="about this many prompt tokens per reply")
    p.add_argument("--decode-tokens", type=int, default=64, help="text tokens of the decode case's reply (≥ 4)")
    p.add_argument("--replies", type=int, default=16, help="spoken replies at once in the speech case")
    p.add_argument("--reply-tokens", type=int, default=16, help="text tokens per spoken reply")
    p.add_argument("--frames", type=int, default=100, help="codec frames per spoken reply")
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)

    config = _config(args)
    with tempfile.TemporaryDirectory() as folder:
        model = random_model(Path(folder), config, dtype, device, args.compile, args.seed)
        processor = OmniProcessor.from_pretrained(folder)
        results = []
        for case in args.cases.split(","):
            if case == "frame":
                results += [_frame(model, config, rows, args, device, dtype) for rows in _ints(args.frame_batch)]
            elif case == "decode":
                results.append(_decode(model, processor, args, device))
            elif case == "speech":
                results.append(_speech(model, processor, args, device))
            else:
                raise SystemExit(f"unknown case {case!r}: choose from {', '.join(CASES)}")
    from torch._dynamo.utils import counters

    settings = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "widths": args.widths,
                **({"layers": args.layers} if args.widths == "full" else {}), "compile": args.compile,
                "warmup": args.warmup, "repeats": args.repeats,
                # compiled steps run without their CUDA graph (0 when all were graphed; TORCH_LOGS=perf_hints says why)
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    common.report("bench_gpu", args, settings, results, ["target", "extra"])


def _config(args) -> dict:
    if args.widths == "full":
        return common.full_width_config(args.layers)
    from common.tiny import build_config, build_tokenizer

    return build_config(build_tokenizer(), "small")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


# ----------------------------------------------------------------------------------------------------------
# A model of random weights, built on the device


def random_model(folder: Path, config: dict, dtype: torch.dtype, device: torch.device, compile: str,
                 seed: int) -> OmniModel:
    """Every stage of `config` with random weights drawn on `device`, and a checkpoint folder of everything else
    (config, tokenizer, processor files) at `folder`."""
    from common.tiny import write_model_files

    write_model_files(folder, config)
    cfg = load_config(folder)
    gen = torch.Generator(device=device).manual_seed(seed)
    thinker = random_stage(ThinkerLM, cfg.thinker_config, "thinker", dtype, device, gen)
    audio = random_stage(AudioEncoder, cfg.thinker_config.audio_config, "audio_encoder", dtype, device, gen)
    vision = random_stage(VisionEncoder, cfg.thinker_config.vision_config, "vision_encoder", dtype, device, gen)
    talker = random_stage(Talker, cfg.talker_config, "talker", dtype, device, gen)
    ids = [cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]
    talker.set_tts_embeds(thinker.model.embed_tokens.weight[ids])  # as `Talker.from_pretrained` reads them
    code2wav = random_stage(Code2Wav, cfg.code2wav_config, "code2wav", dtype, device, gen)
    return OmniModel(folder, cfg, load_generation_config(folder), OmniTokenizer.from_pretrained(folder), thinker,
                     audio, vision, talker, code2wav, compile)


def random_stage(module_class, stage_cfg, stage: str, dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator):
    """The stage built on meta, its parameters assigned from random tensors and its buffers computed, as
    `load_stage_weights` does with a checkpoint's tensors. Each parameter is drawn as the test checkpoints draw the
    hub tensor of its name (`common.tiny.init_tensor`); stacked experts [E, out, in] as each expert's matrix."""
    from common.tiny import init_tensor

    with built_on_meta():
        module = module_class(stage_cfg)
    tensors = {}
    for name, param in module.named_parameters():
        shape = tuple(param.shape)
        if name.rsplit(".", 1)[-1] in STACKED_EXPERTS:  # N(0, 1/fan_in) of one expert: fan_in is the last dim
            tensor = torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[-1])
        else:
            tensor = init_tensor(hub_names(name, STAGE_PREFIXES[stage])[0], shape, gen)
        tensors[name] = tensor.to(dtype)
    module.load_state_dict(tensors, strict=True, assign=True)
    materialise_buffers(module, device)
    return module.eval()


# ----------------------------------------------------------------------------------------------------------
# Cases


def _frame(model: OmniModel, config: dict, rows: int, args, device, dtype) -> common.Result:
    """One frame's residual codes at `rows` rows: ours against transformers' code predictor on the same weights."""
    from common.sampling import SamplingParams
    from stages.code_predictor import FramePredictor, predictor_params

    talker = model.talker
    predictor = talker.code_predictor
    hidden = talker.cfg.text_config.hidden_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    talker_hidden = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    c0 = torch.randint(0, talker.cfg.text_config.vocab_size, (rows,), generator=gen, device=device)
    c0_embeds = talker.model.codec_embedding(c0)  # [B, H]
    params = [predictor_params(SamplingParams())] * rows
    frames = FramePredictor(predictor, rows, compiled=args.compile == "on", c0_head=talker.codec_head.weight,
                            c0_table=talker.model.codec_embedding.weight)
    hf = _transformers_code_predictor(talker, config, dtype, device)
    groups = talker.cfg.num_code_groups

    def ours():
        return frames(talker_hidden, c0_embeds, params, [None] * rows)[0]

    def theirs():
        out = hf.generate(inputs_embeds=torch.stack([talker_hidden, c0_embeds], dim=1),
                          max_new_tokens=groups - 1, do_sample=False)
        return out[:, -(groups - 1):]

    ours_t, hf_t = common.time_pair([ours, theirs], device, args.warmup, args.repeats)
    with torch.inference_mode():
        same = float((ours() == theirs()).float().mean())
    ms = ours_t.median * 1e3
    print(f"code predictor frame ×{rows}: ours {ms:.2f} ms, transformers {hf_t.median * 1e3:.2f} ms, "
          f"same codes {same:.0%}", flush=True)
    target = f"≤ 2 ms: {'met' if ms <= 2 else 'missed'}" if rows == 1 else "–"
    return common.Result(f"code predictor frame ×{rows}", ours_t, hf_t, {
        "same_codes": same, "target": target,
        "extra": f"same codes {same:.0%}; {ours_t.median / FRAME_SECONDS / rows:.4f} × real time per row"})


def _transformers_code_predictor(talker: Talker, config: dict, dtype, device):
    """transformers' code predictor built from the same config, holding our weights (the hub's names)."""
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration as CodePredictor,
    )

    from common.checkpoint import STAGE_PREFIXES, to_hub_state_dict

    hf_cfg = Qwen3OmniMoeConfig(**config).talker_config.code_predictor_config
    with torch.device(device):
        hf = CodePredictor._from_config(hf_cfg, dtype=dtype)
    prefix = "talker.code_predictor."
    weights = {name.removeprefix(prefix): tensor
               for name, tensor in to_hub_state_dict(talker, STAGE_PREFIXES["talker"]).items()
               if name.startswith(prefix)}
    hf.load_state_dict(weights, strict=True)
    return hf.eval()


def _prompt(processor: OmniProcessor, rows: int, tokens: int) -> dict:
    words = " ".join(f"word{i}" for i in range(tokens))[: tokens]  # about one token per character
    messages = [{"role": "user", "content": [{"type": "text", "text": words}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text] * rows))


def _decode(model: OmniModel, processor: OmniProcessor, args, device) -> common.Result:
    """The thinker's decode step at batch 1, against reading its active weights once at the measured bandwidth."""
    inputs = _prompt(processor, 1, args.prompt_tokens)
    n = args.decode_tokens

    def step_seconds() -> float:
        """The median time between the tokens of the reply's second half, as its text reaches the caller."""
        arrivals = []
        model.generate(inputs, return_audio=False, thinker_max_new_tokens=n, thinker_min_new_tokens=n,
                       repetition_penalty=1.0, on_text=lambda row, delta: arrivals.append(time.perf_counter()))
        arrivals = arrivals[:n]  # one call per token, then one for the end of the text
        return statistics.median(b - a for a, b in zip(arrivals[n // 2 :], arrivals[n // 2 + 1 :]))

    with torch.inference_mode():
        for _ in range(args.warmup):
            step_seconds()
        steps = common.Timing([step_seconds() for _ in range(args.repeats)])
    step_bytes = _active_bytes(model.thinker, inputs["input_ids"].shape[1] + n)
    bandwidth = _copy_bandwidth(device)
    bound = step_bytes / bandwidth
    share = bound / steps.median
    print(f"thinker decode step ×1: {steps.median * 1e3:.3f} ms; {step_bytes / 1e9:.2f} GB at "
          f"{bandwidth / 1e12:.2f} TB/s is {bound * 1e3:.3f} ms: {share:.0%} of the bound", flush=True)
    return common.Result("thinker decode step ×1", steps, None, {
        "active_gb": step_bytes / 1e9, "bandwidth_tb_s": bandwidth / 1e12, "bound_share": share,
        "target": f"≥ 60 % of the bound: {'met' if share >= 0.6 else 'missed'}",
        "extra": f"{share:.0%} of the weights-read bound ({bound * 1e3:.3f} ms: {step_bytes / 1e9:.2f} GB at "
                 f"{bandwidth / 1e12:.2f} TB/s measured); prompt {inputs['input_ids'].shape[1]} tokens"})


def _active_bytes(thinker: ThinkerLM, context: int) -> int:
    """What one batch-1 decode step must read: every weight but the embedding table (one row of it), the routed
    experts' share of each MoE layer's experts, and the KV cache of `context` positions."""
    text = thinker.cfg.text_config
    total = 0
    for name, p in thinker.named_parameters():
        if name.endswith("embed_tokens.weight"):
            total += p.shape[1] * p.element_size()
        elif name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj") and p.dim() == 3:
            total += p.numel() * p.element_size() * text.num_experts_per_tok // p.shape[0]
        else:
            total += p.numel() * p.element_size()
    itemsize = thinker.lm_head.weight.element_size()
    return total + 2 * text.num_hidden_layers * context * text.num_key_value_heads * text.head_dim * itemsize


def _copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a device-to-device copy of 2 GiB (CPU: 256 MiB)."""
    size = 2**31 if device.type == "cuda" else 2**28
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    (seconds,) = common.time_pair([lambda: dst.copy_(src)], device, 2, 5)
    return 2 * size / seconds.median


def _speech(model: OmniModel, processor: OmniProcessor, args, device) -> common.Result:
    """`--replies` spoken replies at once, against the seconds of speech each holds."""
    inputs = _prompt(processor, args.replies, args.prompt_tokens)
    kwargs = dict(thinker_max_new_tokens=args.reply_tokens, thinker_min_new_tokens=args.reply_tokens,
                  repetition_penalty=1.0)
    frames = args.frames

    def speaking():
        return model.generate(inputs, talker_max_new_tokens=frames + 1, talker_min_new_tokens=frames + 1, **kwargs)

    def text_only():
        return model.generate(inputs, return_audio=False, **kwargs)

    spoken_t, text_t = common.time_pair([speaking, text_only], device, args.warmup, args.repeats)
    produced = {r.codes.shape[-1] for r in speaking()}
    seconds = frames * FRAME_SECONDS
    voicing = spoken_t.median - text_t.median
    print(f"{args.replies} spoken replies: {spoken_t.median:.3f} s, text alone {text_t.median:.3f} s, "
          f"{seconds:.1f} s of speech each ({sorted(produced)} frames)", flush=True)
    return common.Result(f"{args.replies} spoken replies at once", spoken_t, None, {
        "text_only_s": text_t.median, "speech_s_per_reply": seconds, "voicing_rtf": voicing / seconds,
        "target": f"faster than real time: {'met' if voicing < seconds else 'missed'}",
        "extra": f"text alone {text_t.median:.3f} s; speaking part {voicing:.3f} s for {seconds:.1f} s of speech "
                 f"per reply (RTF {voicing / seconds:.3f}); whole call RTF {spoken_t.median / seconds:.3f}"})


if __name__ == "__main__":
    main()
