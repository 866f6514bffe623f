"""The ``agent-prune`` command line: parse, dispatch, and turn failures into one-line errors.

Each sub-command lives in ``agent_prune/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. Exit codes: 0 ok, 1 run finished without reaching its target, 2 bad input,
130 interrupted (resumable). Set ``AGENT_PRUNE_DEBUG=1`` (or pass ``--debug``) for tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from agent_prune import __version__
from agent_prune.errors import EXIT_INTERRUPTED, AgentPruneError

COMMANDS = ("run", "resume", "trace", "profile", "eval", "apply", "export", "heal")

EPILOG = """examples:
  agent-prune eval --model ../shared/models/smollm2-135m-instruct --data-dir ../shared/data --tasks wikitext2
  agent-prune run --model M --target-sparsity 0.2 --planner heuristic --out runs/r1
  agent-prune trace runs/r1
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-prune",
        description="Structured pruning of decoder-only LLMs, guided by a planner LLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"agent-prune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _command_module(name)
        if module is not None:
            module.add_parser(subparsers)
    return parser


def _command_module(name: str):
    try:
        return importlib.import_module(f"agent_prune.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"agent_prune.commands.{name}":
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = args.debug or os.environ.get("AGENT_PRUNE_DEBUG") == "1"
    try:
        return int(args.handler(args) or 0)
    except AgentPruneError as exc:
        if debug:
            raise
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        resumable = getattr(args, "resume_hint", None)
        hint = f"; resume with: {resumable}" if resumable else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
