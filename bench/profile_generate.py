"""Where the time of one `OmniModel.generate` goes, by stage: wall and CPU time of each engine method on its thread.

cProfile sees only the calling thread and the engines run on threads of their own, so this wraps the engine methods
with timers instead (nested: a step's time includes its decode and its sampling). CPU time is the calling thread's
(`time.thread_time`): on a loaded machine it moves less than wall time. The engines run at once, so the stages'
times add up to more than the call's. `--ops` adds a torch.profiler table of the operators of the timed call.

    python -m bench.profile_generate --model small --batch 1 --compile on
    python -m bench.profile_generate --model small --batch 8 --compile on --ops
"""

from __future__ import annotations

import collections
import functools
import time

import torch

from bench import common
from bench.bench_generate import make_inputs

TIMERS: dict[str, float] = collections.defaultdict(float)
CPU: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)


def timed(owner, name: str, label: str) -> None:
    """Replace `owner.name` by the same function that adds its wall time to TIMERS[label]."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            TIMERS[label] += time.perf_counter() - start
            CPU[label] += time.thread_time() - cpu
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    from stages import code2wav_engine, omni, talker_engine, thinker_engine
    from stages.code2wav import Code2Wav
    from stages.code_predictor import FramePredictor

    timed(omni.OmniModel, "_thinker_prompt", "1 encoders")
    timed(omni._Replies, "run", "2 engines at once (thinker, talker, code2wav)")
    timed(thinker_engine.ThinkerEngine, "__init__", "2.1 thinker engine start (warm-up)")
    timed(thinker_engine.ThinkerEngine, "_prefill", "2.2 thinker prefill (+ first sample)")
    timed(thinker_engine.ThinkerEngine, "_step", "2.3 thinker step")
    timed(thinker_engine.ThinkerEngine, "_decode", "2.3.1 thinker decode (step input + graph)")
    timed(thinker_engine.ThinkerEngine, "_sample", "2.x thinker sampling (prefill's and steps')")
    timed(thinker_engine.ThinkerEngine, "_advance", "2.x thinker advance (bookkeeping, hand over)")
    timed(talker_engine.TalkerEngine, "__init__", "3.1 talker engine start (warm-up)")
    timed(talker_engine.TalkerEngine, "_prefill", "3.2 talker prefill")
    timed(talker_engine.TalkerEngine, "_sample_frames", "3.3 talker c0 + residual codes")
    timed(talker_engine.TalkerEngine, "_frames", "3.3.1 frames (c0 + residual codes, before hand over)")
    timed(FramePredictor, "with_c0", "3.3.1.1 FramePredictor.with_c0 (greedy rows)")
    timed(FramePredictor, "__call__", "3.3.1.2 FramePredictor (sampled rows)")
    timed(talker_engine.TalkerEngine, "_feed_frames", "3.4 talker feed")
    timed(talker_engine.TalkerEngine, "_decode", "3.4.1 talker decode")
    timed(code2wav_engine.Code2WavEngine, "_decode_ready", "4 code2wav: ready calls")
    timed(Code2Wav, "step", "4.1 Code2Wav.step")


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    common.add_checkpoint_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--audio-frames", type=int, default=100)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="on")
    p.add_argument("--ops", action="store_true", help="also a torch.profiler operator table of the timed call")
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)
    ckpt = common.build_checkpoint(args, dtype)

    from common.processor import OmniProcessor
    from stages.omni import OmniModel

    instrument()
    processor = OmniProcessor.from_pretrained(ckpt)
    model = OmniModel.from_pretrained(ckpt, device=device, dtype=dtype, compile=args.compile)
    inputs = make_inputs(processor, "audio", args.batch, 2.0, args.seed)
    eos = common.generation_eos_ids(ckpt)

    def call():
        return model.generate(inputs, thinker_max_new_tokens=args.new_tokens, thinker_min_new_tokens=args.new_tokens,
                              thinker_eos_token_id=eos, talker_max_new_tokens=args.audio_frames)

    call()  # compiles (or loads the compiled steps from inductor's cache)
    for _ in range(2):
        TIMERS.clear()
        CPU.clear()
        CALLS.clear()
        start, cpu = time.perf_counter(), time.process_time()
        out = call()
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        frames = sum(int(r.codes.shape[-1]) for r in out)
        print(f"\nbatch {args.batch}, compile {args.compile}: generate {total * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU "
              f"(all threads), "
              f"{sum(len(r.token_ids) for r in out)} tokens, {frames} frames; {common.machine_line(common.machine())}")
        print(f"  {'part':<50} {'wall':>8}     {'CPU':>8}     {'calls':>5}        {'CPU/call':>8}")
        for label in sorted(TIMERS):
            print(f"  {label:<50} {TIMERS[label] * 1e3:8.1f} ms  {CPU[label] * 1e3:8.1f} ms  {CALLS[label]:5d} calls  "
                  f"{CPU[label] / CALLS[label] * 1e3:7.3f} ms/call")
    if args.ops:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
    main()
