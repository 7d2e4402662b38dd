"""The `omniray` command line: make-tiny, generate, serve, batch.

Each subcommand registers its own arguments and runs lazily-imported code, so `omniray --help` stays fast
and a subcommand never pays for another's imports.
"""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--variant", choices=["default", "alt"], default="default",
                   help="tiny shape: 'default', or 'alt' (other head sizes, 8 code groups)")
    p.add_argument("--thinker-only", action="store_true",
                   help="enable_audio_output: false, without talker and code2wav weights")
    p.set_defaults(func=_make_tiny)


def _serve(args: argparse.Namespace) -> int:
    from deployments.serve_cli import run

    return run(args)


def _add_serve(sub) -> None:
    from deployments.serve_cli import add_arguments

    p = sub.add_parser("serve", help="run the OpenAI-compatible service on Ray Serve")
    add_arguments(p)
    p.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniray", description="Serve Qwen3-Omni on Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_tiny(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
