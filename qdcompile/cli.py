"""``qdcompile`` command line: demo, calibrate, sample, eval, bench, train-reference."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name -> module of qdcompile.commands (each has add_parser(subparsers) and run(args))
COMMANDS = {"demo": "demo", "calibrate": "calibrate", "sample": "sample", "train-reference": "train_reference",
            "bench": "bench", "eval": "eval"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f".commands.{module}", __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        resume = (f"; rerun the same command to resume from {args.checkpoint}"
                  if getattr(args, "checkpoint", None) else "")
        print(f"\nqdcompile {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError) as e:
        from .metadata import MetadataError

        if isinstance(e, (FileNotFoundError, MetadataError)) or type(e) is ValueError:
            print(f"qdcompile {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
