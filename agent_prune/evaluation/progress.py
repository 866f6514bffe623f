"""A minimal progress interface, so evaluation code reports progress without knowing about rich."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    def task(self, description: str, total: int) -> Advance:
        """Start a task of ``total`` steps; the returned function advances it by some steps."""
        ...


class NoProgress:
    def task(self, description: str, total: int) -> Advance:
        return lambda steps: None


NO_PROGRESS = NoProgress()
