"""The `omniray` command line: make-tiny, generate, serve, batch.

Each subcommand registers its own arguments and runs lazily-imported code, so `omniray --help` stays fast
and a subcommand never pays for another's imports.
"""

from __future__ import annotations

import argparse
import sys

from common.config import DEFAULT_VOICE
from common.errors import InvalidRequestError


def _make_tiny(args: argparse.Namespace) -> int:
    from common.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.dir, seed=args.seed, variant=args.variant, thinker_only=args.thinker_only)
    print(f"wrote a tiny random Qwen3-Omni checkpoint ({args.variant}"
          f"{', thinker only' if args.thinker_only else ''}) to {out}")
    return 0


def _add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the real hub format")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=["default", "alt", "small"], default="default",
                   help="tiny shape: 'default', 'alt' (other head sizes, 8 code groups) or 'small' (hidden 256, "
                        "16 experts: the benchmarks' model)")
    p.add_argument("--thinker-only", action="store_true",
                   help="enable_audio_output: false, without talker and code2wav weights")
    p.set_defaults(func=_make_tiny)


def _conversation(args: argparse.Namespace) -> list[dict]:
    """--messages FILE.json, or --system / --image / --audio / --video / --prompt as one user turn. Bad input is
    an `InvalidRequestError` (printed, exit status 2)."""
    if args.no_audio and args.output_wav:
        raise InvalidRequestError("--output-wav writes the speech that --no-audio turns off: drop one of them")
    if args.messages:
        if args.system or args.image or args.audio or args.video:
            raise InvalidRequestError("--messages holds the whole conversation: put the system prompt and media "
                                      "in it rather than in --system / --image / --audio / --video")
        return _read_messages(args.messages)
    content = [{"type": kind, kind: path} for kind in ("image", "audio", "video") for path in getattr(args, kind)]
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "system", "content": [{"type": "text", "text": args.system}]}] if args.system else []
    return messages + [{"role": "user", "content": content}]


def _read_messages(path: str) -> list[dict]:
    """A JSON list of messages. Content parts may be the OpenAI API's (`image_url`, `input_audio`, `audio_url`,
    `video_url`, as sent to `omniray serve`) or the processor's (`{"type": "image", "image": PATH}`, ...)."""
    import json

    try:
        with open(path) as f:
            messages = json.load(f)
    except OSError as e:
        raise InvalidRequestError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequestError(f"{path} must hold a non-empty JSON list of messages (objects with role and content)")
    return [{**m, "content": [_processor_item(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def _processor_item(part):
    """An OpenAI content part → the processor's item (other parts unchanged)."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind == "input_audio" and isinstance(part.get("input_audio"), dict):
        import base64
        import binascii

        try:
            return {"type": "audio", "audio": base64.b64decode(part["input_audio"].get("data", ""), validate=True)}
        except (binascii.Error, ValueError) as e:
            raise InvalidRequestError(f"input_audio.data is not base64: {e}") from None
    target = {"image_url": "image", "audio_url": "audio", "video_url": "video"}.get(kind)
    if target is not None and isinstance(part.get(kind), dict):
        return {"type": target, target: part[kind].get("url")}
    return part


def _generate(args: argparse.Namespace) -> int:
    import json

    from common.errors import OmniError
    from common.processor import OmniProcessor
    from common.tiny import embedded_tiny_checkpoint
    from stages.omni import OmniModel

    try:
        conversation = _conversation(args)  # before loading the model: a bad file fails at once
    except OmniError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    model_ref = args.model or str(embedded_tiny_checkpoint())
    model = OmniModel.from_pretrained(model_ref)
    processor = OmniProcessor.from_pretrained(model.folder)
    try:
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)
        result = model.generate(
            inputs, speaker=args.speaker, return_audio=False if args.no_audio else None,
            thinker_max_new_tokens=args.max_tokens, talker_max_new_tokens=args.max_audio_tokens, seed=args.seed,
            on_text=lambda row, delta: print(delta, end="", flush=True),
        )[0]
    except OmniError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print()
    if result.waveform is not None and args.output_wav:
        import soundfile as sf

        sf.write(args.output_wav, result.waveform, result.sample_rate, subtype="PCM_16")
        print(f"wrote {len(result.waveform) / result.sample_rate:.2f} s of audio to {args.output_wav}", file=sys.stderr)
    elif args.output_wav:
        print(f"this checkpoint has no speech output (thinker only): {args.output_wav} not written", file=sys.stderr)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({
                "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                "codes": result.codes.tolist() if result.codes is not None else None,
                "sample_rate": result.sample_rate,
                "wav": args.output_wav if result.waveform is not None and args.output_wav else None,
            }, f)
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="one conversation through the model in this process (text and speech)")
    p.add_argument("--model", help="checkpoint folder or hub id (default: the embedded tiny checkpoint)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the user's text")
    source.add_argument("--messages", help="a JSON file with the whole conversation: a list of messages, content "
                        "parts as sent to `omniray serve` (image_url, input_audio, audio_url, video_url with local "
                        "paths, file:// or data: URLs) or the processor's ({\"type\": \"image\", \"image\": PATH})")
    p.add_argument("--image", action="append", default=[], help="image file for the user turn (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="audio file for the user turn (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file for the user turn (repeatable)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--speaker", default=DEFAULT_VOICE, help="voice (one of the checkpoint's speakers)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most text tokens to generate")
    p.add_argument("--max-audio-tokens", type=int, default=4096,
                   help="most codebook-0 tokens of the talker (at most this minus one 80 ms frames)")
    p.add_argument("--no-audio", action="store_true", help="text only")
    p.add_argument("--seed", type=int)
    p.add_argument("--output-wav", help="write the speech here (24 kHz, 16-bit)")
    p.add_argument("--output-json", help="write text, token_ids, codes, sample_rate and the wav path here")
    p.set_defaults(func=_generate)


def _serve(args: argparse.Namespace) -> int:
    from deployments.serve_cli import run

    return run(args)


def _add_serve(sub) -> None:
    from deployments.serve_cli import add_arguments

    p = sub.add_parser("serve", help="run the OpenAI-compatible service on Ray Serve")
    add_arguments(p)
    p.set_defaults(func=_serve)


def _batch(args: argparse.Namespace) -> int:
    from common.errors import OmniError
    from deployments.batch import BatchOptions, run_batch

    try:
        run_batch(BatchOptions(
            input=args.input, output=args.output, model=args.model or "", modalities=args.modalities,
            speaker=args.speaker, max_tokens=args.max_tokens, max_audio_tokens=args.max_audio_tokens,
            temperature=args.temperature, concurrency=args.stage_concurrency, cpus_per_stage=args.cpus_per_stage,
            gpus_per_stage=args.gpus_per_stage, batch_rows=args.batch_rows, shard_rows=args.shard_rows,
            torch_threads=args.torch_threads, compile=args.compile,
        ))
        return 0
    except OmniError as e:  # the input or the output folder, before anything ran
        print(f"error: {e.message}", file=sys.stderr)
        return 2


def _modalities(text: str) -> tuple[str, ...]:
    modalities = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modalities or any(m not in ("text", "audio") for m in modalities):
        raise argparse.ArgumentTypeError(f"{text!r}: use text, audio or text,audio")
    return modalities


def _stage_concurrency(text: str) -> dict[str, int]:
    from deployments.batch import STAGES

    sizes = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        stage, _, size = entry.partition("=")
        if stage not in STAGES or not size.isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"{entry!r}: use STAGE=N with N >= 1, STAGE one of {', '.join(STAGES)}")
        sizes[stage] = int(size)
    return sizes


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="run a JSONL dataset of chat requests as a Ray job (resumable)",
                       description="Each row is ours ({\"id\", \"messages\", ...chat request fields}) or OpenAI's "
                       "Batch form ({\"custom_id\", \"method\", \"url\", \"body\"}); the flags are defaults a "
                       "row's own fields override. Rerun with the same --output to resume.")
    p.add_argument("--input", required=True, help="a JSONL file or a folder of *.jsonl shards (local, or any URI "
                   "pyarrow reads); relative media paths are relative to the file")
    p.add_argument("--output", required=True, help="output folder: results.jsonl, audio/, shards/, manifest.json")
    p.add_argument("--model", help="checkpoint folder or hub id (default: the embedded tiny checkpoint)")
    p.add_argument("--modalities", type=_modalities, default=("text",), help="text, or text,audio (default text)")
    p.add_argument("--speaker", default=DEFAULT_VOICE, help="voice of rows that name none")
    p.add_argument("--max-tokens", type=int, default=512, help="text tokens of rows that name no max_tokens")
    p.add_argument("--max-audio-tokens", type=int, default=4096,
                   help="talker tokens (codec frames) of rows that name no talker_max_tokens")
    p.add_argument("--temperature", type=float, help="of rows that name none (0: greedy; default: the checkpoint's)")
    p.add_argument("--stage-concurrency", type=_stage_concurrency, default={},
                   help="actors per stage, e.g. thinker=2,talker=2 (stages: encoders, thinker, talker, code2wav; "
                   "default 1 each)")
    p.add_argument("--cpus-per-stage", type=float, default=0.25, help="CPUs each actor and task reserves")
    p.add_argument("--gpus-per-stage", type=float, default=0.0, help="GPUs each stage actor reserves (1 on GPUs)")
    p.add_argument("--batch-rows", type=int, default=8, help="rows a thinker or talker actor decodes together")
    p.add_argument("--shard-rows", type=int, default=64, help="rows per committed shard of results")
    p.add_argument("--torch-threads", type=int, help="CPU threads of each stage actor")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compiled decode steps (auto: on CUDA only; `on` for a long job on CPUs: each actor compiles "
                        "for minutes at the first run on a machine, seconds later from the disk cache)")
    p.set_defaults(func=_batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniray", description="Serve Qwen3-Omni on Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_tiny(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_batch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
