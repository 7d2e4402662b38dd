"""Soak: minutes of mixed load against a local omniray, recording every replica's memory and every reply's status.

The app is deployed on a local Ray as `omniray serve` deploys it (the CPU defaults, or `--serve-config`), then
`--concurrency` clients each send requests back to back for `--minutes`, cycling through a mix:
- text: a whole reply, and a streamed one (sampled);
- speech: a streamed spoken reply, and a whole one (text plus WAV; greedy, so every reply has its audio);
- media: a small image and a second of audio in, a streamed text reply out (both encoders);
- bad requests, each of which must get its 4xx (malformed JSON, an unknown voice, `n` > 1, too many tokens, an
  unknown model);
- disconnects: a streamed spoken reply the client drops after its first chunks.

Every `--sample-s` seconds it records the resident memory (RSS) of each Serve replica process of this Ray (the
stage replicas, the HTTP proxy and the controller: the processes of this run's Ray, found under this process).
It reports, per process, the growth from the end of the warm-up (`--warmup-minutes`; the median of the first
three samples after it) to the end (the median of the last three), against the target of under 5 %, and the
requests by kind and status, against the target of no 5xx. After the load, every stage must hold no request
(its `describe()`: nothing in flight, an empty batch), or the disconnects leaked work.

There is no baseline to run beside it: the figures are ours alone (the machine line says how comparable they are).

    python -m bench.bench_soak                        # 10 minutes, tiny checkpoint, CPU defaults, 8 clients
    python -m bench.bench_soak --minutes 2 --no-record
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime
import io
import json
import shlex
import statistics
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bench import common
from bench.bench_serve import local_service

MIB = 1024 * 1024
GROWTH_TARGET = 0.05
STAGES_WITH_REQUESTS = ("vision_encoder", "audio_encoder", "thinker", "talker", "code2wav")
SPOKEN = {"modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16"},
          "temperature": 0, "talker_temperature": 0, "talker_max_tokens": 40}
QUESTIONS = ["Hello there, who are you?", "Count to three, please.", "What is the capital of France?",
             "Tell me a short story about a cat."]


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    common.add_checkpoint_args(p)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="memory growth is measured from here")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending requests back to back")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--serve-config", type=Path, default=None, help="a serve config file (default: CPU defaults)")
    p.add_argument("--port", type=int, default=8013)
    args = p.parse_args()
    if args.warmup_minutes >= args.minutes:
        raise SystemExit("--warmup-minutes must be shorter than --minutes")
    _, dtype = common.resolve_device_dtype(args)
    ckpt = common.build_checkpoint(args, dtype)
    with local_service(ckpt, args) as url:
        load, memory, leftover = asyncio.run(soak(url, args))
    settings = {"model": args.model, "minutes": args.minutes, "warmup_minutes": args.warmup_minutes,
                "concurrency": args.concurrency, "sample_s": args.sample_s,
                "serve_config": str(args.serve_config or "CPU defaults"), "checkpoint": common.checkpoint_summary(ckpt)}
    record(args, settings, load, memory, leftover)


# --- the load ----------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """Every request's kind, outcome (an HTTP status, or what went wrong) and seconds."""

    outcomes: collections.Counter = field(default_factory=collections.Counter)  # (kind, outcome) → count
    seconds: dict = field(default_factory=lambda: collections.defaultdict(list))  # kind → seconds of each

    def add(self, kind: str, outcome: str, seconds: float) -> None:
        self.outcomes[kind, outcome] += 1
        self.seconds[kind].append(seconds)

    def server_errors(self) -> int:
        return sum(n for (_, outcome), n in self.outcomes.items() if outcome.startswith("5"))

    def failures(self) -> int:
        """Replies that did not end as they should: 5xx, a wrong status, an incomplete reply, a client error."""
        return sum(n for (_, outcome), n in self.outcomes.items() if not outcome.startswith(("ok", "disconnected")))


def _body(i: int, **extra) -> dict:
    """A request without `model`: the service's own."""
    return {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], **extra}


def _media() -> tuple[str, str]:
    """A 64×48 PNG and one second of a 440 Hz tone at 16 kHz (WAV), as the data URI and the base64 the API takes."""
    png = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(png, format="PNG")
    tone = (np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 0.3 * 32767).astype("<i2")
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tone.tobytes())
    return ("data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
            base64.b64encode(wav.getvalue()).decode())


IMAGE, AUDIO = _media()

BAD_REQUESTS = [  # (body, the status it must get)
    ("{not json", 400),
    (_body(0, **{**SPOKEN, "audio": {"voice": "darth", "format": "pcm16"}}), 400),
    (_body(0, n=3), 400),
    (_body(0, max_tokens=10**9), 400),
    ({**_body(0), "model": "gpt-7"}, 404),
]


async def text(http, i: int) -> str:
    r = await http.post("/v1/chat/completions", json=_body(i, max_tokens=24))
    if r.status_code != 200:
        return str(r.status_code)
    return "ok" if r.json()["choices"][0]["finish_reason"] else "incomplete"


async def speech(http, i: int) -> str:
    r = await http.post("/v1/chat/completions",
                        json=_body(i, max_tokens=16, **{**SPOKEN, "audio": {"voice": "ethan", "format": "wav"}}))
    if r.status_code != 200:
        return str(r.status_code)
    message = r.json()["choices"][0]["message"]
    return "ok" if message.get("audio") and message["audio"]["data"] else "no audio"


async def text_stream(http, i: int) -> str:
    return await _stream(http, _body(i, max_tokens=24, stream=True), audio=False)


async def speech_stream(http, i: int) -> str:
    return await _stream(http, _body(i, max_tokens=16, stream=True, **SPOKEN), audio=True)


async def media(http, i: int) -> str:
    content = [{"type": "image_url", "image_url": {"url": IMAGE}},
               {"type": "input_audio", "input_audio": {"data": AUDIO, "format": "wav"}},
               {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 24, "stream": True}
    return await _stream(http, body, audio=False)


async def _stream(http, body: dict, audio: bool) -> str:
    """The reply streamed to its end: "ok" with a finish reason, [DONE] and (spoken) audio."""
    finished = done = heard = False
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return str(r.status_code)
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return "error event"
            choice = event["choices"][0] if event.get("choices") else {}
            finished |= bool(choice.get("finish_reason"))
            heard |= bool((choice.get("delta", {}).get("audio") or {}).get("data"))
    if not (finished and done):
        return "incomplete"
    return "ok" if heard or not audio else "no audio"


async def disconnect(http, i: int) -> str:
    """A long spoken stream, dropped after its first three chunks (the connection closes with the block)."""
    body = _body(i, max_tokens=400, ignore_eos=True, stream=True, **{**SPOKEN, "talker_max_tokens": 600})
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return str(r.status_code)
        chunks = 0
        async for line in r.aiter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                return "disconnected"
    return "ended before the client left"


async def bad(http, i: int) -> str:
    body, expected = BAD_REQUESTS[i % len(BAD_REQUESTS)]
    if isinstance(body, str):
        r = await http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = await http.post("/v1/chat/completions", json=body)
    if r.status_code != expected:
        return str(r.status_code)
    error = r.json().get("error", {})
    return "ok" if set(error) == {"message", "type", "param", "code"} else "no OpenAI error body"


# one client's cycle: 1 in 10 requests bad and 1 in 10 a disconnect, the rest real work, speech for 4 in 10
MIX = [("text", text), ("speech_stream", speech_stream), ("text_stream", text_stream), ("speech", speech),
       ("media", media), ("bad", bad), ("speech_stream", speech_stream), ("text", text),
       ("disconnect", disconnect), ("speech_stream", speech_stream)]


async def client_loop(url: str, offset: int, deadline: float, load: Load) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        i = offset
        while time.monotonic() < deadline:
            kind, send = MIX[i % len(MIX)]
            start = time.monotonic()
            try:
                outcome = await send(http, i)
            except httpx.HTTPError as error:  # a dropped connection, a timeout: the service failed this client
                outcome = type(error).__name__
            load.add(kind, outcome, time.monotonic() - start)
            i += 1


# --- memory ------------------------------------------------------------------------------------------------------


def serve_processes() -> dict[str, "psutil.Process"]:
    """This run's Serve actors, the Ray processes under this one, by name and pid (`ServeReplica:omniray:thinker
    pid 1234`, `ProxyActor pid 1200`, ...: a replica that Serve started again, or a second one, is a row of its own)."""
    import psutil  # comes with ray (its thirdparty_files, on the path once ray is imported)

    found = {}
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and ("Serve" in title or "Proxy" in title):
            name = title.removeprefix("ray::").split()[0].split(".")[0]  # the title names a running method too
            found[f"{name} pid {process.pid}"] = process
    return found


def rss_sample() -> dict[str, float]:
    import psutil

    sample = {}
    for name, process in serve_processes().items():
        try:
            sample[name] = process.memory_info().rss / MIB
        except psutil.Error:
            continue
    return sample


async def sample_memory(deadline: float, every_s: float, samples: list) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - started, await asyncio.to_thread(rss_sample)))
        await asyncio.sleep(every_s)


def memory_growth(samples: list, warmup_s: float) -> dict[str, dict]:
    """Per process: MiB at the end of the warm-up and at the end (medians of three samples), and the growth."""
    after = [sample for t, sample in samples if t >= warmup_s]
    growth = {}
    for name in sorted({name for _, sample in samples for name in sample}):
        series = [sample[name] for sample in after if name in sample]
        if len(series) < 6:
            growth[name] = {"samples": len(series)}  # too few to tell (a process that came or went)
            continue
        start, end = statistics.median(series[:3]), statistics.median(series[-3:])
        growth[name] = {"start_mib": round(start, 1), "end_mib": round(end, 1), "peak_mib": round(max(series), 1),
                        "growth": round(end / start - 1, 4), "samples": len(series)}
    return growth


# --- the run -----------------------------------------------------------------------------------------------------


async def soak(url: str, args) -> tuple[Load, dict, dict]:
    load, samples = Load(), []
    deadline = time.monotonic() + args.minutes * 60
    print(f"soak: {args.concurrency} clients for {args.minutes} min against {url}", flush=True)
    progress = asyncio.create_task(_progress(load, deadline))
    await asyncio.gather(sample_memory(deadline, args.sample_s, samples),
                         *(client_loop(url, i, deadline, load) for i in range(args.concurrency)))
    progress.cancel()
    await asyncio.sleep(5)  # the disconnected replies' last steps
    leftover = await asyncio.to_thread(stages_busy)
    samples.append((args.minutes * 60, await asyncio.to_thread(rss_sample)))
    memory = {"growth": memory_growth(samples, args.warmup_minutes * 60), "samples": samples}
    return load, memory, leftover


async def _progress(load: Load, deadline: float) -> None:
    while True:
        await asyncio.sleep(60)
        print(f"  {max(0.0, deadline - time.monotonic()) / 60:.1f} min left: {sum(load.outcomes.values())} "
              f"requests, {load.failures()} failed, {load.server_errors()} 5xx", flush=True)


def stages_busy() -> dict[str, dict]:
    """Each stage that still holds a request after the load: what `describe()` says it holds."""
    from ray import serve

    busy = {}
    for stage in STAGES_WITH_REQUESTS:
        held = serve.get_deployment_handle(stage, "omniray").describe.remote().result(timeout_s=60)
        if held["in_flight"] or held["batch"]:
            busy[stage] = {"in_flight": held["in_flight"], "batch": held["batch"]}
    return busy


def record(args, settings: dict, load: Load, memory: dict, leftover: dict) -> None:
    """Print the tables; unless --no-record, write the JSON and append a section to RESULTS.md."""
    info = common.machine()
    growth = memory["growth"]
    measured = [g["growth"] for g in growth.values() if "growth" in g]
    worst = max(measured, default=None)
    # a run too short to sample memory after its warm-up has no growth figure: the target is then not shown met
    memory_verdict = ("no process sampled long enough after the warm-up for a growth figure (target: not shown)"
                      if worst is None else f"worst {worst:+.1%} (target under {GROWTH_TARGET:.0%}: "
                                            f"{'met' if worst < GROWTH_TARGET else 'missed'})")
    verdict = (f"memory growth after warm-up: {memory_verdict}; "
               f"5xx: {load.server_errors()} (target none: {'met' if load.server_errors() == 0 else 'missed'}); "
               f"other failures: {load.failures() - load.server_errors()}; "
               f"stages holding requests after the load: {leftover or 'none'}")
    tables = f"{_requests_table(load)}\n\n{_memory_table(growth)}"
    command = "python -m bench.bench_soak " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"\nbench_soak — {common.machine_line(info)}\n{settings}\n{tables}\n{verdict}")
    if args.no_record:
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    common.RESULTS_DIR.mkdir(exist_ok=True)
    path = common.RESULTS_DIR / f"bench_soak-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({
        "benchmark": "bench_soak", "date": now.isoformat(timespec="seconds"), "command": command.strip(),
        "machine": info, "settings": settings, "note": args.note, "verdict": verdict,
        "outcomes": [{"kind": k, "outcome": o, "count": n} for (k, o), n in sorted(load.outcomes.items())],
        "seconds_p50": {k: statistics.median(v) for k, v in load.seconds.items()},
        "memory": memory, "stages_holding_requests": leftover,
    }, indent=1) + "\n")
    settings_line = ", ".join(f"{k} {v}" for k, v in settings.items())
    with common.RESULTS_MD.open("a") as f:
        f.write(f"\n## {now:%Y-%m-%d %H:%M} UTC — bench_soak\n\n- machine: {common.machine_line(info)}\n"
                f"- command: `{command.strip()}`\n- settings: {settings_line}\n"
                + (f"- note: {args.note}\n" if args.note else "")
                + f"- raw: `bench/results/{path.name}`\n- result: {verdict}\n\n{tables}\n")
    print(f"recorded {path.relative_to(common.REPO_DIR)} and a section in bench/RESULTS.md")


def _requests_table(load: Load) -> str:
    lines = ["| requests | outcome | count | p50 of the kind |", "|---|---|---|---|"]
    for (kind, outcome), n in sorted(load.outcomes.items()):
        lines.append(f"| {kind} | {outcome} | {n} | {statistics.median(load.seconds[kind]) * 1e3:.0f} ms |")
    return "\n".join(lines)


def _memory_table(growth: dict) -> str:
    lines = ["| process | RSS after warm-up | RSS at the end | peak | growth |", "|---|---|---|---|---|"]
    for name, g in growth.items():
        if "growth" not in g:
            lines.append(f"| {name} | – | – | – | {g['samples']} samples only |")
        else:
            lines.append(f"| {name} | {g['start_mib']:.0f} MiB | {g['end_mib']:.0f} MiB | {g['peak_mib']:.0f} MiB "
                         f"| {g['growth']:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
