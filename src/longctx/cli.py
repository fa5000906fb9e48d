"""The ``longctx`` command: maps subcommands to functions, nothing else."""

from __future__ import annotations

import argparse
import sys


def _bench_attention(args) -> int:
    from .bench import attention

    attention.run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import attention

    parser = argparse.ArgumentParser(
        prog="longctx", description="Long-context attention: benchmarks and tools."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench", help="benchmarks (time, memory, FLOP/s vs N)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = bench_sub.add_parser(
        "attention",
        help="attention ops vs N: time, useful GFLOP/s, peak memory",
        description=attention.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    attention.add_arguments(p)
    p.set_defaults(func=_bench_attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ValueError as exc:  # bad options: a clear message, no traceback
        print(f"longctx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
