"""Through the service: N concurrent chat completions to omniray on Ray Serve vs transformers serving the same N
requests the way it can today, one `generate` call after another (batch 1, no server).

- transformers: `Qwen3OmniMoeForConditionalGeneration.generate` on each request's processor output in turn, in
  this process, before Ray starts (so the stage replicas take no CPU from it). Each request's latency is its wait
  for the ones before it plus its own call.
- ours: the app deployed on a local Ray (the CPU defaults, or `--serve-config`, e.g. serve_config.gpu_packed.yaml
  on one GPU), then N streaming requests at once through the `openai` client. Per request: time to first token,
  to first audio, to the end; for all of them: the wall time until the last reply ends.

Both decode greedily and produce exactly `--new-tokens` text tokens per request (ours: `min_tokens` = `max_tokens`,
transformers: `thinker_min_new_tokens`), speech until the codec end or `--audio-frames`. One non-streaming pass
of every request checks ours gives transformers' token ids before anything is timed.

At `--concurrency 1` the service is also compared with `OmniModel.generate` in this process (no Ray, no HTTP),
the service's overhead alone:
- text: the processor and a whole `generate` of the reply, against the service's end-to-end latency;
- first audio: `OmniModel.generate` streams no audio, so its first audio is timed as the work that has to come
  before the first PCM, one stage after another: the processor and a `generate` with `F` reply tokens and `F`
  codec frames, `F` the first Code2Wav chunk's frames (the thinker's prefill and the `F` tokens those frames
  read, the talker's prefill and `F` frames, one Code2Wav call of `F` frames). Against it: the service's time
  to the first audio delta at the client. The issue's target is at most 1.5× that + 50 ms.

    python -m bench.bench_serve                                          # CPU, tiny checkpoint, 8 at once
    python -m bench.bench_serve --device cuda --model full --layers 8 --serve-config serve_config.gpu_packed.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from bench.bench_generate import QUESTIONS, same_tokens

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE_OUT = 24000


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    common.add_checkpoint_args(p)
    p.add_argument("--cases", default="text,speech", help="comma list of text, speech")
    p.add_argument("--concurrency", type=int, default=8, help="requests sent at once")
    p.add_argument("--new-tokens", type=int, default=24, help="text tokens per reply")
    p.add_argument("--audio-frames", type=int, default=40, help="talker_max_tokens (codec frames + 1)")
    p.add_argument("--serve-config", type=Path, default=None, help="a serve config file (default: CPU defaults)")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compiled steps, for the service's replicas and the in-process OmniModel alike")
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)
    ckpt = common.build_checkpoint(args, dtype)
    cases = args.cases.split(",")
    conversations = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))}]
                     for i in range(args.concurrency)]

    hf = common.load_transformers(ckpt, dtype, device)
    baseline = {case: transformers_serial(hf, ckpt, conversations, case == "speech", args, device, dtype)
                for case in cases}
    del hf  # the GPU memory goes to the stage replicas next
    in_process = omni_in_process(ckpt, conversations[0], cases, args, device, dtype) if args.concurrency == 1 else {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with local_service(ckpt, args, args.compile) as url:
        results = [service_case(url, case, conversations, baseline[case], args) for case in cases]
    results += [against_in_process(result, in_process) for result in results if in_process]

    settings = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "model": args.model,
                **({"layers": args.layers} if args.model == "full" and args.checkpoint is None else {}),
                "concurrency": args.concurrency, "new_tokens": args.new_tokens, "audio_frames": args.audio_frames,
                "serve_config": str(args.serve_config) if args.serve_config else "CPU defaults",
                "compile": args.compile,
                "repeats": args.repeats, "checkpoint": common.checkpoint_summary(ckpt)}
    common.report("bench_serve", args, settings, results, ["extra"])


# --- transformers, one request after another ---------------------------------------------------------------------


def transformers_serial(hf, ckpt: Path, conversations, speech: bool, args, device, dtype) -> dict:
    """Wall times of serving every conversation in turn (`--repeats` passes), and each one's token ids."""
    from common.config import load_generation_config
    from common.processor import OmniProcessor

    processor = OmniProcessor.from_pretrained(ckpt)
    eos = common.generation_eos_ids(ckpt)
    penalty = load_generation_config(ckpt).get("repetition_penalty", 1.0)
    n = args.new_tokens

    def one(conversation):
        inputs = processor([processor.apply_chat_template(conversation, add_generation_prompt=True)])
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        with torch.inference_mode():
            out = hf.generate(**inputs, return_audio=speech, speaker="ethan", thinker_max_new_tokens=n,
                              thinker_min_new_tokens=n, thinker_eos_token_id=eos, thinker_do_sample=False,
                              thinker_repetition_penalty=penalty, talker_do_sample=False,
                              talker_max_new_tokens=args.audio_frames)
        common.sync(device)
        sequence = out[0] if speech else out
        return sequence[0, inputs["input_ids"].shape[1]:].tolist()

    for _ in range(args.warmup):
        one(conversations[0])
    walls, finishes = [], []
    for _ in range(args.repeats):
        start, done = time.perf_counter(), []
        tokens = []
        for conversation in conversations:
            tokens.append(one(conversation))
            done.append(time.perf_counter() - start)
        walls.append(done[-1])
        finishes.append(done)
    return {"walls": walls, "latency_p50": statistics.median(finishes[-1]), "tokens": tokens}


# --- OmniModel in this process (the --concurrency 1 comparisons) -------------------------------------------------


def omni_in_process(ckpt: Path, conversation, cases: list[str], args, device, dtype) -> dict[str, common.Timing]:
    """Seconds of the in-process counterparts (module docstring): "text" (the whole reply) and "speech" (to the
    first Code2Wav chunk), each with the processor, `--repeats` runs after `--warmup`."""
    from common.processor import OmniProcessor
    from stages.code2wav import CodecChunking
    from stages.omni import OmniModel

    model = OmniModel.from_pretrained(ckpt, device=device, dtype=dtype, compile=args.compile)
    processor = OmniProcessor.from_pretrained(ckpt)
    eos = common.generation_eos_ids(ckpt)
    first = CodecChunking().ramp[0]  # the service's default first chunk
    runs = {"text": dict(return_audio=False, thinker_max_new_tokens=args.new_tokens,
                         thinker_min_new_tokens=args.new_tokens),
            "speech": dict(return_audio=True, thinker_max_new_tokens=first, thinker_min_new_tokens=first,
                           talker_max_new_tokens=first + 1, talker_min_new_tokens=first + 1)}

    def one(case: str) -> float:
        start = time.perf_counter()
        inputs = processor([processor.apply_chat_template(conversation, add_generation_prompt=True)])
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        out = model.generate(inputs, speaker="ethan", do_sample=False, thinker_eos_token_id=eos, **runs[case])[0]
        common.sync(device)
        if case == "speech":
            assert out.codes.shape[-1] == first, out.codes.shape  # exactly the first chunk's frames
        return time.perf_counter() - start

    timings = {}
    for case in cases:
        for _ in range(args.warmup):
            one(case)
        timings[case] = common.Timing([one(case) for _ in range(args.repeats)])
    del model
    return timings


def against_in_process(result: common.Result, in_process: dict[str, common.Timing]) -> common.Result:
    """A --concurrency 1 service result against OmniModel in this process: text latency, or time to first audio."""
    speech = "ttfa_runs_s" in result.extra
    ours = common.Timing(result.extra["ttfa_runs_s"] if speech else result.ours.seconds)
    theirs = in_process["speech" if speech else "text"]
    if speech:
        target = 1.5 * theirs.median + 0.05
        text = (f"first audio ours {ours.median * 1e3:.0f} ms / in-process {theirs.median * 1e3:.0f} ms; "
                f"target ≤ 1.5× + 50 ms = {target * 1e3:.0f} ms")
    else:
        text = (f"text latency ours {ours.median * 1e3:.0f} ms / in-process {theirs.median * 1e3:.0f} ms; "
                f"target ≤ 1.1× = {1.1 * theirs.median * 1e3:.0f} ms")
    name = "first audio ×1" if speech else "text ×1"
    return common.Result(f"{name} vs OmniModel in-process (in the transformers column)", ours, theirs,
                         {"extra": text, "ratio_ours_over_in_process": ours.median / theirs.median})


# --- ours, through the service -----------------------------------------------------------------------------------


class local_service:
    """A local Ray with the app deployed (as `omniray serve` deploys it); yields the base URL. `compile`: the
    replicas' compile setting, as `omniray serve --compile` gives it (None: the service's own, or the config file's)."""

    def __init__(self, ckpt: Path, args, compile: str | None = None):
        self.ckpt, self.args, self.compile = ckpt, args, compile

    def __enter__(self) -> str:
        import ray

        from deployments import serve_cli

        ray.init(namespace="serve", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        cli = argparse.Namespace(model=str(self.ckpt), config=self.args.serve_config, host="127.0.0.1",
                                 port=self.args.port, api_key=None, address=None, compile=self.compile)
        deploy = serve_cli._deploy_config if cli.config is not None else serve_cli._deploy_builder
        deploy(cli)
        return f"http://127.0.0.1:{self.args.port}"

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def service_case(url: str, case: str, conversations, baseline: dict, args) -> common.Result:
    return asyncio.run(_service_case(url, case, conversations, baseline, args))


async def _service_case(url: str, case: str, conversations, baseline: dict, args) -> common.Result:
    import openai

    speech = case == "speech"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    body = {"max_tokens": args.new_tokens, "temperature": 0,
            "extra_body": {"min_tokens": args.new_tokens, "talker_temperature": 0,
                           **({"talker_max_tokens": args.audio_frames} if speech else {})},
            **({"modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16"}} if speech else {})}
    model = (await client.models.list()).data[0].id

    async def whole(conversation) -> list[int]:  # the correctness pass: token ids come with a whole reply
        reply = await client.chat.completions.create(model=model, messages=conversation, **body)
        return reply.choices[0].token_ids  # vLLM's return_token_ids field, always sent

    async def streamed(conversation, start: float) -> dict:
        marks = {"first_token": None, "first_audio": None, "samples": 0}
        stream = await client.chat.completions.create(model=model, messages=conversation, stream=True, **body)
        async for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is None:
                continue
            now = time.perf_counter() - start
            if delta.content and marks["first_token"] is None:
                marks["first_token"] = now
            audio = getattr(delta, "audio", None)
            data = audio.get("data") if isinstance(audio, dict) else getattr(audio, "data", None)
            if data:
                marks["first_audio"] = marks["first_audio"] if marks["first_audio"] is not None else now
                marks["samples"] += len(data) * 3 // 4 // 2  # base64 of PCM16
        marks["end"] = time.perf_counter() - start
        return marks

    async def burst() -> tuple[float, list[dict]]:
        start = time.perf_counter()
        marks = await asyncio.gather(*(streamed(c, start) for c in conversations))
        return time.perf_counter() - start, marks

    ours_tokens = await asyncio.gather(*(whole(c) for c in conversations))
    same = same_tokens(ours_tokens, baseline["tokens"])
    for _ in range(args.warmup):
        await burst()
    runs = [await burst() for _ in range(args.repeats)]
    walls = [wall for wall, _ in runs]
    marks = runs[-1][1]
    ttft = statistics.median(m["first_token"] for m in marks if m["first_token"] is not None)
    extra = {"concurrency": len(conversations), "same_tokens": same, "ours_ttft_p50_s": ttft,
             "ours_latency_p50_s": statistics.median(m["end"] for m in marks),
             "transformers_latency_p50_s": baseline["latency_p50"]}
    text = [f"{len(conversations)} at once; same tokens {same:.0%}", f"TTFT p50 ours {ttft * 1e3:.0f} ms",
            f"latency p50 ours {extra['ours_latency_p50_s'] * 1e3:.0f} ms / transformers "
            f"{baseline['latency_p50'] * 1e3:.0f} ms"]
    if speech:
        ttfa = statistics.median(m["first_audio"] for m in marks if m["first_audio"] is not None)
        seconds = np.mean([m["samples"] / SAMPLE_RATE_OUT for m in marks])
        ttfa_runs = [statistics.median(m["first_audio"] for m in run if m["first_audio"] is not None)
                     for _, run in runs]
        extra.update(ours_ttfa_p50_s=ttfa, speech_seconds_per_reply=float(seconds), ttfa_runs_s=ttfa_runs)
        text.append(f"TTFA p50 ours {ttfa * 1e3:.0f} ms; {seconds:.2f} s of speech per reply")
    extra["extra"] = "; ".join(text)
    return common.Result(f"{case} ×{len(conversations)} concurrent", common.Timing(walls),
                         common.Timing(baseline["walls"]), extra)


if __name__ == "__main__":
    main()
