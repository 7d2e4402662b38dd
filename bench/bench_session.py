"""Thinker time to first token per turn over one conversation, the session's KV kept (ours) against every turn
prefilled afresh (the baseline: what a service without sessions does, and what transformers' generate does).

Each turn's prompt is the whole conversation so far through the chat template (user turns of `--user-words` words,
an audio clip of `--audio-seconds` every `--audio-every` turns, greedy replies of exactly `--new-tokens` tokens fed
back as the assistant's text), run through two `ThinkerEngine`s in one process: one with a `SessionStore` (each turn
prefills only what follows the kept prefix), one without. Time to first token = from `submit` to the engine handing
over the first step (prefill plus the first sample). The turns alternate which engine goes first. Both engines'
replies are compared token for token. Also per turn: the audio encoder over every clip of the conversation, which
the service still runs each turn (the encoders are outside the session's reuse).

    python -m bench.bench_session                    # CPU, the small checkpoint, 10 turns
    python -m bench.bench_session --device cuda --model full --layers 8 --turns 20 --audio-seconds 10
"""

from __future__ import annotations

import threading
import time

import torch

from bench import common
from bench.bench_generate import QUESTIONS, chirp
from common.processor import OmniProcessor
from common.sampling import SamplingParams
from stages.omni import OmniModel, thinker_prompt
from stages.thinker_engine import ThinkerEngine
from stages.thinker_sessions import SessionStore


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    common.add_checkpoint_args(p)
    p.set_defaults(model="small", repeats=1, warmup=1)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=24, help="reply tokens per turn")
    p.add_argument("--user-words", type=int, default=40, help="words of each user turn's text")
    p.add_argument("--audio-seconds", type=float, default=3.0, help="the clip of a turn with audio")
    p.add_argument("--audio-every", type=int, default=2, help="every k-th turn has a clip (0: none)")
    args = p.parse_args()
    device, dtype = common.resolve_device_dtype(args)
    ckpt = common.build_checkpoint(args, dtype)
    results, settings = run(args, ckpt, device, dtype)
    common.report("bench_session", args, settings, results,
                  ["fresh_ttft", "fresh/ours", "prompt_tokens", "reused_tokens", "same_tokens", "encoder"])


def run(args, ckpt, device, dtype):
    model = OmniModel.from_pretrained(ckpt, device=device, dtype=dtype, compile="off")
    processor = OmniProcessor.from_pretrained(ckpt)
    layer = model.cfg.talker_config.accept_hidden_layer if model.cfg.has_talker else None
    max_len = 16384
    kept = ThinkerEngine(model.thinker, max_rows=1, max_len=max_len, accept_hidden_layer=layer,
                         sessions=SessionStore(max_sessions=4, max_tokens=4 * max_len, idle_s=3600.0))
    fresh = ThinkerEngine(model.thinker, max_rows=1, max_len=max_len, accept_hidden_layer=layer)
    params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    try:
        for _ in range(args.warmup):  # one short turn each, not timed
            warm = conversation_prompt(processor, model, turns(args, 1), [], device)
            first_token(kept, "warm", warm, params, session="warm")
            first_token(fresh, "warm", warm, params)
        results = []
        replies: list[str] = []
        for turn in range(args.turns):
            prompt = conversation_prompt(processor, model, turns(args, turn + 1), replies, device)
            order = [("kept", kept), ("fresh", fresh)] if turn % 2 == 0 else [("fresh", fresh), ("kept", kept)]
            timed = {}
            for name, engine in order:
                timed[name] = first_token(engine, f"{name}-{turn}", prompt, params,
                                          session="chat" if name == "kept" else None)
            ours, base = timed["kept"], timed["fresh"]
            encoder_s = time_encoder(model, processor, turns(args, turn + 1), replies, device)
            results.append(common.Result(f"turn {turn + 1}", common.Timing([ours["ttft"]]), None, {
                "fresh_ttft": f"{base['ttft'] * 1e3:.2f} ms", "fresh/ours": round(base["ttft"] / ours["ttft"], 2),
                "prompt_tokens": prompt.input_ids.shape[1], "reused_tokens": ours["cached"],
                "same_tokens": ours["tokens"] == base["tokens"], "encoder": f"{encoder_s * 1e3:.2f} ms",
                "fresh_ttft_s": base["ttft"], "encoder_s": encoder_s}))
            replies.append(model.tokenizer.decode(ours["tokens"], skip_special_tokens=True))
    finally:
        kept.close()
        fresh.close()
    settings = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "model": args.model,
                "turns": args.turns, "new_tokens": args.new_tokens, "user_words": args.user_words,
                "audio_seconds": args.audio_seconds, "audio_every": args.audio_every,
                "checkpoint": common.checkpoint_summary(ckpt)}
    return results, settings


def turns(args, n: int) -> list[tuple[str, float | None]]:
    """The first n user turns: (text, seconds of audio or None)."""
    out = []
    for k in range(n):
        words = " ".join(QUESTIONS[(k + j) % len(QUESTIONS)] for j in range(args.user_words)).split()
        audio = args.audio_seconds if args.audio_every and k % args.audio_every == 0 else None
        out.append((f"Turn {k + 1}: " + " ".join(words[: args.user_words]), audio))
    return out


def conversation(user_turns, replies):
    """Chat messages and the audio clips in order: every user turn, and the replies given so far."""
    messages, clips = [{"role": "system", "content": [{"type": "text", "text": "You are Qwen."}]}], []
    for k, (text, audio) in enumerate(user_turns):
        content = [{"type": "text", "text": text}]
        if audio is not None:
            content.insert(0, {"type": "audio"})
            clips.append(chirp(audio, seed=k))
        messages.append({"role": "user", "content": content})
        if k < len(replies):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": replies[k]}]})
    return messages, clips


def processed(processor, user_turns, replies) -> dict:
    messages, clips = conversation(user_turns, replies)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor([text], **({"audio": clips} if clips else {}))


def conversation_prompt(processor, model, user_turns, replies, device):
    inputs = processed(processor, user_turns, replies)
    return thinker_prompt({k: v.to(device) for k, v in inputs.items()}, model.audio_encoder, model.vision_encoder,
                          False)


def time_encoder(model, processor, user_turns, replies, device) -> float:
    """The audio encoder over every clip of the conversation (what each turn runs in the service)."""
    inputs = processed(processor, user_turns, replies)
    if "input_features" not in inputs:
        return 0.0
    features = inputs["input_features"].to(device, next(model.audio_encoder.parameters()).dtype)
    lengths = inputs["feature_attention_mask"].sum(-1).to(device)
    with torch.inference_mode():
        common.sync(device)
        began = time.perf_counter()
        model.audio_encoder(features, lengths)
        common.sync(device)
    return time.perf_counter() - began


def first_token(engine, request_id: str, prompt, params, session: str | None = None) -> dict:
    """Run one request to its end: its time to first token (s), its tokens, its prompt tokens reused."""
    steps, first, done = [], [], threading.Event()

    def on_step(step):
        if not first:
            first.append(time.perf_counter())
        steps.append(step)
        if isinstance(step, BaseException) or step.finish_reasons[0] is not None:
            done.set()

    common.sync(prompt.input_ids.device)
    began = time.perf_counter()
    engine.submit(request_id, prompt, params, False, on_step, session=session)
    done.wait()
    if isinstance(steps[-1], BaseException):
        raise steps[-1]
    return {"ttft": first[0] - began, "tokens": [s.token_ids[0] for s in steps], "cached": steps[0].cached_tokens}


if __name__ == "__main__":
    main()
