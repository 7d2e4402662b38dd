"""The batch job (`omniray batch`) over N rows against transformers' batched generate over the same rows.

Rows: the bench's questions, alternately text-only and spoken (`--speech-every`), each with exactly `--new-tokens`
reply tokens (`min_tokens` = `max_tokens`; transformers: `thinker_min_new_tokens`) and speech until the codec end or
`--audio-frames`, greedy. transformers runs its own batched `generate` over the text rows and over the spoken rows,
`--hf-batch` rows per call (left-padded, as its processor pads), in this process, before Ray starts. Ours runs the
whole job as a user would, `run_batch` on a fresh output folder, twice: the first run's wall time includes starting
Ray; the second, on the Ray already up, is the one compared (it still starts the stage actors and loads their
weights: part of a job, which it prints apart: its startup, until the first row started, and the rows after it).
The texts of both are compared with transformers'.

Then the HTTP service on the same Ray (`omniray serve`'s app, the CPU defaults or `--serve-config`) gets the same
rows as chat completions, `--service-concurrency` (16) at a time through the `openai` client, each a whole reply
(speech as wav); its wall time is the second row's baseline, and its texts are compared too.

    python -m bench.bench_batch                     # CPU, the small checkpoint, 64 rows
    python -m bench.bench_batch --device cuda --model full --layers 8 --rows 256 --hf-batch 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from bench.bench_generate import QUESTIONS
from bench.bench_serve import local_service


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    common.add_checkpoint_args(p)
    p.set_defaults(model="small", repeats=1, warmup=0)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--speech-every", type=int, default=2, help="every k-th row asks for speech")
    p.add_argument("--new-tokens", type=int, default=24, help="text tokens per reply")
    p.add_argument("--audio-frames", type=int, default=40, help="talker_max_tokens (codec frames + 1)")
    p.add_argument("--hf-batch", type=int, default=16, help="rows per transformers generate call")
    p.add_argument("--batch-rows", type=int, default=16, help="rows a thinker or talker actor runs at once")
    p.add_argument("--service-concurrency", type=int, default=16, help="requests in flight to the HTTP service")
    p.add_argument("--serve-config", type=Path, default=None, help="the service's serve config (default: CPU)")
    p.add_argument("--port", type=int, default=8012)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compiled steps, for the job's stage actors and the service's replicas alike")
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)
    ckpt = common.build_checkpoint(args, dtype)
    rows = make_rows(args)

    hf = common.load_transformers(ckpt, dtype, device)
    hf_s, hf_texts = transformers_batched(hf, ckpt, rows, args, device, dtype)
    del hf
    cold_s, _, cold_texts = ours_job(ckpt, rows, args)
    ours_s, startup_s, ours_texts = ours_job(ckpt, rows, args)
    import ray

    ray.shutdown()
    service_s, service_texts = through_service(ckpt, rows, args)

    same = sum(ours_texts.get(r["id"]) == hf_texts[r["id"]] == cold_texts.get(r["id"]) for r in rows) / len(rows)
    same_service = sum(service_texts.get(r["id"]) == hf_texts[r["id"]] for r in rows) / len(rows)
    spoken = sum(1 for r in rows if "audio" in r["modalities"])
    extra = {"rows": len(rows), "spoken_rows": spoken, "same_text": same, "ours_first_run_s": cold_s,
             "ours_startup_s": startup_s,
             "extra": f"{len(rows)} rows ({spoken} spoken); same text {same:.0%}; ours' startup (until the first row "
                      f"started; transformers' load is not timed) {startup_s:.1f} s, the rows after it "
                      f"{ours_s - startup_s:.1f} s; ours' first run, starting Ray: {cold_s:.1f} s"}
    job = common.Result(f"batch job, {len(rows)} rows", common.Timing([ours_s]), common.Timing([hf_s]), extra)
    service = common.Result(
        f"batch job vs the HTTP service at c={args.service_concurrency}", common.Timing([ours_s]),
        common.Timing([service_s]), {"same_text": same_service, "service_s": service_s,
                                      "extra": f"baseline: the service, {service_s:.1f} s; service text same as "
                                               f"transformers {same_service:.0%}"})
    settings = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "model": args.model,
                "new_tokens": args.new_tokens, "audio_frames": args.audio_frames, "hf_batch": args.hf_batch,
                "batch_rows": args.batch_rows, "service_concurrency": args.service_concurrency, "compile": args.compile,
                "checkpoint": common.checkpoint_summary(ckpt)}
    common.report("bench_batch", args, settings, [job, service], ["extra"])


def make_rows(args) -> list[dict]:
    rows = []
    for i in range(args.rows):
        speech = i % args.speech_every == 0
        rows.append({
            "id": f"row-{i}",
            "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
            "modalities": ["text", "audio"] if speech else ["text"],
            "max_tokens": args.new_tokens, "min_tokens": args.new_tokens, "temperature": 0,
            **({"talker_max_tokens": args.audio_frames} if speech else {}),
        })
    return rows


def transformers_batched(hf, ckpt: Path, rows: list[dict], args, device, dtype) -> tuple[float, dict[str, str]]:
    """Seconds for transformers to generate every row, `--hf-batch` rows per call (text rows and spoken rows in
    separate calls), and each row's reply text."""
    from common.processor import OmniProcessor

    processor = OmniProcessor.from_pretrained(ckpt)
    eos = common.generation_eos_ids(ckpt)
    penalty = json.loads((ckpt / "generation_config.json").read_text()).get("repetition_penalty", 1.0)
    texts, seconds = {}, 0.0
    for speech in (False, True):
        group = [r for r in rows if ("audio" in r["modalities"]) == speech]
        for start in range(0, len(group), args.hf_batch):
            chunk = group[start : start + args.hf_batch]
            prompts = [processor.apply_chat_template(r["messages"], add_generation_prompt=True) for r in chunk]
            inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                      for k, v in processor(text=prompts).items()}
            common.sync(device)
            began = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(**inputs, return_audio=speech, speaker="ethan", thinker_eos_token_id=eos,
                                  thinker_max_new_tokens=args.new_tokens, thinker_min_new_tokens=args.new_tokens,
                                  thinker_do_sample=False, thinker_repetition_penalty=penalty,
                                  talker_do_sample=False, talker_max_new_tokens=args.audio_frames)
            common.sync(device)
            seconds += time.perf_counter() - began
            sequences = out[0] if speech else out
            for r, ids in zip(chunk, sequences[:, inputs["input_ids"].shape[1] :].tolist()):
                texts[r["id"]] = processor.tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
    return seconds, texts


def ours_job(ckpt: Path, rows: list[dict], args) -> tuple[float, float, dict[str, str]]:
    """Seconds for `run_batch` over the rows into a fresh folder, of them the job's startup (until the first row
    started: the stage actors starting and loading their weights), and each row's reply text."""
    from deployments.batch import BatchOptions, run_batch

    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "rows.jsonl", Path(tmp) / "out"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        began = time.perf_counter()
        progress = run_batch(BatchOptions(
            input=str(source), output=str(output), model=str(ckpt), max_tokens=args.new_tokens,
            max_audio_tokens=args.audio_frames, batch_rows=args.batch_rows, torch_threads=args.threads,
            compile=args.compile))
        seconds = time.perf_counter() - began
        results = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    return seconds, progress.startup_s, {line["id"]: line["text"] for line in results}


def through_service(ckpt: Path, rows: list[dict], args) -> tuple[float, dict[str, str]]:
    """Seconds for the HTTP service to answer every row, `--service-concurrency` requests in flight, and each
    row's reply text."""
    with local_service(ckpt, argparse.Namespace(serve_config=args.serve_config, port=args.port), args.compile) as url:
        return asyncio.run(_through_service(url, rows, args.service_concurrency))


async def _through_service(url: str, rows: list[dict], concurrency: int) -> tuple[float, dict[str, str]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    slots = asyncio.Semaphore(concurrency)

    async def one(row: dict) -> tuple[str, str]:
        speech = "audio" in row["modalities"]
        extra = {"min_tokens": row["min_tokens"], **({"talker_max_tokens": row["talker_max_tokens"]} if speech else {})}
        async with slots:
            reply = await client.chat.completions.create(
                model=model, messages=row["messages"], modalities=row["modalities"], max_tokens=row["max_tokens"],
                temperature=0, extra_body=extra, **({"audio": {"voice": "ethan", "format": "wav"}} if speech else {}))
        return row["id"], reply.choices[0].message.content

    began = time.perf_counter()
    texts = dict(await asyncio.gather(*(one(row) for row in rows)))
    return time.perf_counter() - began, texts


if __name__ == "__main__":
    main()
