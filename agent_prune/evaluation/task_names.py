"""Names of the evaluation tasks (no torch import, so the CLI can validate flags before loading anything)."""

from __future__ import annotations

from collections.abc import Sequence

from agent_prune.data.tasks import MC_FILES
from agent_prune.errors import InputError

TASKS = ("wikitext2", "freebaseqa", *MC_FILES)


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """Task names from ``"a,b"`` or a list; unknown names are an :class:`InputError`."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise InputError(f"unknown task {', '.join(unknown)}" if unknown else "no task given",
                         f"choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))
