"""Flags and output helpers shared by the sub-commands, so every command spells them the same."""

from __future__ import annotations

import json
import sys

from rich.console import Console

# Progress and tables for people go to stderr; stdout carries results (and only JSON with --json).
stderr_console = Console(stderr=True)
stdout_console = Console()


def add_model_args(parser, required: bool = True) -> None:
    parser.add_argument("--model", required=required,
                        help="local Hugging Face folder, .gguf file, or hub id")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


def add_data_args(parser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="local data directory (default: $AGENT_PRUNE_DATA_DIR, else the HF hub)")


def add_output_args(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated flag value."""
    return [item.strip() for item in text.split(",") if item.strip()]


def print_json(payload) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


class RichProgress:
    """Progress bars on stderr (rich) behind the evaluation's ``Progress`` interface; no-op when quiet."""

    def __init__(self, quiet: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=stderr_console, transient=False,
                                  disable=quiet)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()
        return False

    def task(self, description: str, total: int):
        task_id = self._progress.add_task(description, total=total)
        return lambda steps: self._progress.advance(task_id, steps)
