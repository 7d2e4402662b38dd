"""End to end: `OmniModel.generate` vs transformers' `Qwen3OmniMoeForConditionalGeneration.generate`, greedy.

Both get the same processor output (`common.processor.OmniProcessor`) and the same checkpoint, in one process.
Cases, each at batch 1 and batch `--batch`:
- `text`: a text prompt, text out (`return_audio=False`);
- `audio`: a prompt with a `--audio-seconds` clip and a question, text and speech out.

Per case: wall time of the whole call (median), time to first token (the same call with one new token and no
speech: encoders + prefill + one step), thinker decode tokens/s (the tokens after the first, over the wall time
minus the time to first token; for `audio`, the text-only rate of the `text` case applies, the rest is speech),
and the speech real-time factor (wall time / seconds of speech produced; < 1 is faster than real time).

Every row generates exactly `--new-tokens` text tokens: both get the checkpoint's stop ids and
`thinker_min_new_tokens` = `thinker_max_new_tokens`, so the stop ids are suppressed for the whole reply on both sides
and the rows must be equal token for token. Speech stops at the codec end token or `--audio-frames`, whichever
comes first, on both.

    python -m bench.bench_generate                                        # CPU, tiny checkpoint
    python -m bench.bench_generate --device cuda --model full --layers 8 --new-tokens 128 --batch 8
    python -m bench.bench_generate --model small --cases audio --batch 8 --new-tokens 32 --audio-frames 100 --compile on
"""

from __future__ import annotations

import numpy as np
import torch

from bench import common

SAMPLE_RATE_IN = 16000
SAMPLE_RATE_OUT = 24000
QUESTIONS = ["What can you hear? Answer in one sentence.", "Describe the sound.", "Hello world, who are you?",
             "Numbers 0123456789 and punctuation!"]


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    common.add_checkpoint_args(p)
    p.add_argument("--cases", default="text,audio", help="comma list of text, audio")
    p.add_argument("--batch", type=int, default=4, help="the batched case's rows (batch 1 always runs)")
    p.add_argument("--new-tokens", type=int, default=24, help="text tokens per row")
    p.add_argument("--audio-frames", type=int, default=40, help="talker_max_new_tokens (codec frames + 1)")
    p.add_argument("--audio-seconds", type=float, default=2.0, help="length of the input clip of the audio case")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="our engines' compiled steps (auto: on CUDA); compiling happens in the warm-up runs")
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)
    ckpt = common.build_checkpoint(args, dtype)

    from common.processor import OmniProcessor
    from stages.omni import OmniModel

    processor = OmniProcessor.from_pretrained(ckpt)
    ours = OmniModel.from_pretrained(ckpt, device=device, dtype=dtype, compile=args.compile)
    hf = common.load_transformers(ckpt, dtype, device)

    results = []
    for case in args.cases.split(","):
        for batch in sorted({1, args.batch}):
            inputs = make_inputs(processor, case, batch, args.audio_seconds, args.seed)
            results.append(run_case(case, batch, inputs, ours, hf, args, device, dtype, ckpt))

    settings = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "model": args.model,
                "compile": args.compile,
                **({"layers": args.layers} if args.model == "full" and args.checkpoint is None else {}),
                **common.transformers_settings(hf), "new_tokens": args.new_tokens,
                "audio_frames": args.audio_frames, "audio_seconds_in": args.audio_seconds,
                "warmup": args.warmup, "repeats": args.repeats, "checkpoint": common.checkpoint_summary(ckpt)}
    common.report("bench_generate", args, settings, results, ["extra"])


def make_inputs(processor, case: str, batch: int, audio_seconds: float, seed: int) -> dict:
    """Processor output for `batch` different prompts (left-padded as the processor pads)."""
    conversations, clips = [], []
    for row in range(batch):
        content = [{"type": "text", "text": QUESTIONS[row % len(QUESTIONS)]}]
        if case == "audio":
            content.insert(0, {"type": "audio"})
            clips.append(chirp(audio_seconds * (1 + 0.25 * row), seed + row))
        conversations.append([{"role": "user", "content": content}])
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    return processor(text=texts, audio=clips or None)


def chirp(seconds: float, seed: int) -> np.ndarray:
    """A rising tone with a little noise: speech-like enough for the log-mel to be non-trivial."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE_IN)) / SAMPLE_RATE_IN
    tone = 0.4 * np.sin(2 * np.pi * (200 + 400 * t / seconds) * t)
    return (tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def same_tokens(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Fraction of equal tokens over all rows (a row of a different length counts its extra tokens as unequal)."""
    equal = total = 0
    for ours_row, their_row in zip(ours, theirs):
        equal += sum(a == b for a, b in zip(ours_row, their_row))
        total += max(len(ours_row), len(their_row))
    return equal / total if total else 1.0


def run_case(case: str, batch: int, inputs: dict, ours, hf, args, device, dtype, ckpt) -> common.Result:
    speech = case == "audio"
    n = args.new_tokens
    prompt_len = inputs["input_ids"].shape[1]
    # transformers' thinker.generate does not read the checkpoint's generation_config.json (OmniModel does): hand
    # it the same repetition penalty, or the two do different work
    penalty = ours.generation_config.get("repetition_penalty", 1.0)
    hf_inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    eos = common.generation_eos_ids(ckpt)  # transformers' thinker default is one hard-coded id: same ids on both

    def ours_call(new_tokens: int, audio: bool):
        return ours.generate(inputs, return_audio=audio, thinker_max_new_tokens=new_tokens,
                             thinker_min_new_tokens=new_tokens, thinker_eos_token_id=eos,
                             talker_max_new_tokens=args.audio_frames)

    def hf_call(new_tokens: int, audio: bool):
        with torch.inference_mode():
            return hf.generate(**hf_inputs, return_audio=audio, speaker="ethan",
                               thinker_max_new_tokens=new_tokens, thinker_min_new_tokens=new_tokens,
                               thinker_eos_token_id=eos, thinker_do_sample=False, thinker_repetition_penalty=penalty, talker_do_sample=False,
                               talker_max_new_tokens=args.audio_frames)

    first = common.time_pair([lambda: ours_call(1, False), lambda: hf_call(1, False)], device, args.warmup,
                             args.repeats)
    full = common.time_pair([lambda: ours_call(n, speech), lambda: hf_call(n, speech)], device, args.warmup,
                            args.repeats)
    ours_out, hf_out = ours_call(n, speech), hf_call(n, speech)

    ours_tokens = [r.token_ids for r in ours_out]
    hf_seq = hf_out[0] if speech else hf_out
    hf_tokens = hf_seq[:, prompt_len:].tolist()
    same = same_tokens(ours_tokens, hf_tokens)
    extra = {
        "batch": batch, "prompt_tokens": prompt_len, "new_tokens_per_row": [len(t) for t in ours_tokens],
        "same_tokens": float(same),
        "ours_ttft_s": first[0].median, "transformers_ttft_s": first[1].median,
    }
    text = [f"TTFT ours {first[0].median * 1e3:.0f} ms / transformers {first[1].median * 1e3:.0f} ms",
            f"same tokens {same:.0%}"]
    if not speech:
        ours_rate = batch * (n - 1) / (full[0].median - first[0].median)
        hf_rate = batch * (n - 1) / (full[1].median - first[1].median)
        extra.update(ours_decode_tok_per_s=ours_rate, transformers_decode_tok_per_s=hf_rate)
        text.append(f"decode ours {ours_rate:.1f} tok/s / transformers {hf_rate:.1f} tok/s")
    else:
        ours_audio_s = sum(len(r.waveform) for r in ours_out) / SAMPLE_RATE_OUT
        hf_wavs = hf_out[1] if isinstance(hf_out[1], list) else [hf_out[1].reshape(-1)]
        hf_audio_s = sum(int(w.shape[-1]) for w in hf_wavs) / SAMPLE_RATE_OUT
        extra.update(ours_audio_s=ours_audio_s, transformers_audio_s=hf_audio_s,
                     ours_frames_per_row=[int(r.codes.shape[-1]) for r in ours_out],
                     ours_rtf=full[0].median / ours_audio_s if ours_audio_s else None,
                     transformers_rtf=full[1].median / hf_audio_s if hf_audio_s else None)
        text.append(f"speech ours {ours_audio_s:.2f} s (RTF {_fmt(extra['ours_rtf'])}) / transformers "
                    f"{hf_audio_s:.2f} s (RTF {_fmt(extra['transformers_rtf'])})")
    extra["extra"] = "; ".join(text)
    result = common.Result(f"{case} batch {batch}", full[0], full[1], extra)
    print(f"{result.case}: ours {full[0].median:.3f} s, transformers {full[1].median:.3f} s; {extra['extra']}",
          flush=True)
    return result


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
