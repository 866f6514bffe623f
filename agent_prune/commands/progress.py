"""Live progress for ``run``/``resume``: an iteration panel and progress bars, on stderr."""

from __future__ import annotations

import time

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from agent_prune.agent.reporter import Reporter
from agent_prune.commands.common import stderr_console


def make_reporter(quiet: bool) -> Reporter:
    return QuietReporter() if quiet else RichReporter()


class QuietReporter(Reporter):
    """No live display; warnings still reach stderr as single lines."""

    def warn(self, message: str) -> None:
        stderr_console.print(f"[yellow]warning:[/] {message}", highlight=False)


class RichReporter(Reporter):
    def __init__(self):
        self.started_at = time.monotonic()
        self.target = 0.0
        self.status = "starting"
        self.iteration = 0
        self.sparsity = 0.0
        self.last_decision = "-"
        self.metrics: dict[str, str] = {}
        self.dense: dict = {}
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=stderr_console, transient=True)
        # Started on the first update, so that input errors print without an empty panel.
        self.live = Live(console=stderr_console, refresh_per_second=4, transient=False)
        self.live_started = False

    # ---- Reporter callbacks -------------------------------------------------------------------
    def started(self, options, dense: dict) -> None:
        self.target = options.target_sparsity
        self.dense = dense
        self._set("profiling")

    def planning(self, iteration: int) -> None:
        self.iteration = iteration
        self._set("planning")

    def building(self, iteration: int, branch: str) -> None:
        self._set(f"building {branch} candidate")

    def evaluating(self, iteration: int, branch: str) -> None:
        self._set(f"evaluating {branch} candidate")

    def decided(self, iteration: int, decision: dict, state: dict) -> None:
        self.sparsity = state["current"]["sparsity"]
        verdict = "accepted " + str(decision.get("branch")) if decision["accepted"] else "rolled back"
        self.last_decision = f"{verdict}: {decision.get('reason', '')}"
        chosen = decision.get("metrics") or {}
        self.metrics = {k: v for k, v in chosen.items() if isinstance(v, str)}
        self._set("profiling" if state["status"] == "running" else "finishing")

    def finishing(self, stage: str) -> None:
        self._set(stage)

    def warn(self, message: str) -> None:
        stderr_console.print(f"[yellow]warning:[/] {message}", highlight=False)

    def task(self, description: str, total: int | None = None):
        task = self.bars.add_task(description, total=total)
        done = [0]
        self._update()

        def advance(n: int = 1) -> None:
            done[0] += n
            if total is not None and done[0] >= total:
                self.bars.remove_task(task)
            else:
                self.bars.advance(task, n)
            self._update()

        return advance

    def close(self) -> None:
        if self.live_started:
            self.live.stop()
            stderr_console.line()

    def _update(self) -> None:
        if not self.live_started:
            self.live.start()
            self.live_started = True
        self.live.update(self._render())

    # ---- rendering ----------------------------------------------------------------------------
    def _set(self, status: str) -> None:
        self.status = status
        self._update()

    def _render(self):
        elapsed = time.monotonic() - self.started_at
        table = Table.grid(padding=(0, 2))
        table.add_row("iteration", str(self.iteration), "status", self.status)
        table.add_row("sparsity", f"{self.sparsity:.1%} / {self.target:.1%}",
                      "elapsed", _clock(elapsed))
        eta = self._eta(elapsed)
        table.add_row("last decision", self.last_decision[:80], "ETA", eta)
        for name, value in self.metrics.items():
            table.add_row(name, value, "", "")
        return Group(Panel(table, title="agent-prune run", expand=False), self.bars)

    def _eta(self, elapsed: float) -> str:
        if self.sparsity <= 0 or self.target <= 0:
            return "-"
        remaining = max(self.target - self.sparsity, 0.0) / self.sparsity * elapsed
        return _clock(remaining)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"
