"""The ``agent-prune`` command line: parse, dispatch, and turn failures into one-line errors.

Each sub-command lives in ``agent_prune/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. Exit codes are listed in ``EXIT_CODES`` (and the README). Set
``AGENT_PRUNE_DEBUG=1`` (or pass ``--debug``) for tracebacks; the exit code stays the same.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback

from agent_prune import __version__
from agent_prune.errors import (
    EXIT_CRASH,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    AgentPruneError,
    Terminated,
)
from agent_prune.heap import cap_onednn_kernels, configure_heap

COMMANDS = ("run", "resume", "trace", "profile", "eval", "apply", "export", "heal")

EPILOG = """examples:
  agent-prune eval --model ../shared/models/smollm2-135m-instruct --data-dir ../shared/data --tasks wikitext2
  agent-prune run --model M --target-sparsity 0.2 --planner heuristic --out runs/r1
  agent-prune trace runs/r1

exit codes:
  0    done (a run reached its target sparsity)
  1    a run finished without reaching its target
  2    bad input (a path, a flag, a file that is not what it claims to be)
  3    crash (a bug, or out of memory); rerun with --debug for the traceback
  130  interrupted (Ctrl-C), 143 terminated (SIGTERM): the run directory resumes with
       agent-prune resume RUN_DIR
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
    # Library progress bars (tqdm reads this once, at its first import) would interleave with the
    # CLI's own progress display; a user's own setting wins.
    os.environ.setdefault("TQDM_DISABLE", "1")
    configure_heap()
    cap_onednn_kernels()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = args.debug or os.environ.get("AGENT_PRUNE_DEBUG") == "1"
    # Signal handlers can only be installed from the main thread (in-process callers may differ).
    if threading.current_thread() is not threading.main_thread():
        return _dispatch(args, debug)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _dispatch(args, debug)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _dispatch(args, debug: bool) -> int:
    try:
        return int(args.handler(args) or 0)
    except AgentPruneError as exc:
        return _fail(f"error: {exc.one_line()}", exc.exit_code, debug)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): the run stays resumable
        resumable = getattr(args, "resume_hint", None)
        hint = f"; resume with: {resumable}" if resumable else ""
        terminated = isinstance(exc, Terminated)
        print(f"{'terminated' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as exc:  # anything else is a crash: one line, its own exit code
        return _fail(f"error: {crash_message(exc, getattr(args, 'resume_hint', None))}", EXIT_CRASH,
                     debug)


def _fail(line: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(line, file=sys.stderr)
    return code


def crash_message(exc: BaseException, resume_hint: str | None = None) -> str:
    """One line for an unexpected exception: what it was, and how to see or get past it."""
    detail = " ".join(str(exc).split())[:300]
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if type(exc).__name__ in ("MemoryError", "OutOfMemoryError"):  # torch's OOM keeps this name
        text = (f"out of memory ({what}); try a smaller --seqlen, --batch-size or --calib-samples, "
                "or --dtype bfloat16")
    else:
        text = f"crashed with {what}; this is a bug in agent-prune, please report it"
    text += "; rerun with --debug for the traceback"
    return text + (f"; resume with: {resume_hint}" if resume_hint else "")


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
