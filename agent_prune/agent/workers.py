"""A step's candidates built and scored side by side in worker processes (``--workers N``).

A candidate travels as a directory (its state, then its ``signals.json``), so a job is a few paths
and its result a small dict. Each worker is a ``spawn``ed process (forking once torch has started
its thread pools is unsafe) with its own :class:`~agent_prune.agent.runtime.RunContext` built from
the run's options on its own device, so the dense model, the calibration windows and the evaluator
are loaded once per worker, on first use. With one worker nothing is started: the jobs run in the
run's own process, one after the other, through the same functions.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agent_prune.agent.meter import Meter
from agent_prune.errors import InvalidActionError
from agent_prune.io import read_json

if TYPE_CHECKING:
    from agent_prune.agent.options import RunOptions
    from agent_prune.agent.runtime import RunContext


def build_candidate(ctx: RunContext, current: str, actions: list[dict], profile: str, target: str,
                    pruner: str, measure: bool = False) -> dict:
    """The info of the candidate built from state ``current`` under ``target`` (with its profile from
    the refit walk when ``measure``), or ``{"invalid": why}`` when its actions cannot be applied to
    that state."""
    try:
        return ctx.builder.build(ctx.states, Path(current), actions, read_json(profile), Path(target), pruner,
                                 measure=measure)
    except InvalidActionError as exc:
        return {"invalid": exc.one_line()}


def score_candidate(ctx: RunContext, candidate: str, current_record: str | None = None,
                    dense_record: str | None = None) -> str:
    """The path of the candidate's ``signals.json``, scored from its replay; not probed where its
    perplexity fails the gates against the current and the dense model's ``signals.json`` (both
    given, or neither: then always probed)."""
    if (current_record is None) != (dense_record is None):
        raise ValueError("score_candidate gates on both the current and the dense record, or on neither")
    ctx.states.release()  # a worker's cached step model: scoring's peak is dense + one candidate
    against = (Path(current_record), Path(dense_record)) if current_record is not None else None
    return str(ctx.steps.score_state(Path(candidate), against=against))


TASKS: dict[str, Callable[..., Any]] = {"build": build_candidate, "score": score_candidate}


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``count`` inside the block (left alone for None)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def metered(ctx: RunContext, task: str, job: dict) -> tuple[Any, dict]:
    """``(result, figures)`` of one job: its wall time, peak and end RSS, CPU time and page faults
    (``agent.meter``; in a worker, that process's own), which the trace records per candidate."""
    with Meter() as meter:  # on a trimmed heap, as every measured stretch
        result = TASKS[task](ctx, **job)
    return result, meter.figures()


class WorkerDied(RuntimeError):
    """A worker process ended in the middle of a job (killed, e.g. for memory, or crashed)."""


class WorkerTraceback(Exception):
    """Where an exception raised in a worker came from: the cause of its copy in the run's process."""


def serve(options_json: str, device: str, threads: int, pipe) -> None:
    """A worker's life: ``(task, job)`` in, ``("done", (result, figures))`` or ``("failed", error,
    traceback)`` out, until the run's process terminates it."""
    # Ctrl-C reaches the terminal's whole process group; the run's process stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from agent_prune.agent.options import RunOptions
    from agent_prune.agent.runtime import RunContext
    from agent_prune.heap import configure_heap

    configure_heap()  # as the CLI does in the run's process
    torch.set_num_threads(threads)
    options = RunOptions.model_validate_json(options_json)
    ctx = RunContext(options.model_copy(update={"device": device, "workers": 1, "worker_devices": None}))
    while True:
        try:
            task, job = pipe.recv()
        except EOFError:  # the run's process was killed before it could stop us
            return
        try:
            reply = ("done", metered(ctx, task, job))
        except Exception as exc:
            reply = ("failed", portable(exc), traceback.format_exc())
        pipe.send(reply)


def portable(exc: Exception) -> Exception:
    """``exc`` if it survives the trip through a pipe, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class WorkerPool:
    """Worker processes started once, one per device; a batch of jobs is spread over them and its
    results come back in job order, whichever finishes first."""

    def __init__(self, options: RunOptions, threads: int):
        spawn = multiprocessing.get_context("spawn")
        self.devices = options.worker_devices or [options.device] * options.workers
        self.processes, self.pipes = [], []
        for device in self.devices:
            ours, theirs = spawn.Pipe()
            process = spawn.Process(target=serve, args=(options.model_dump_json(), device, threads, theirs),
                                    name=f"agent-prune worker ({device})", daemon=True)
            process.start()
            theirs.close()  # the worker holds the only other end: its death reads as end of file
            self.processes.append(process)
            self.pipes.append(ours)

    def run(self, task: str, jobs: list[dict], started: Callable[[int], None]) -> list[tuple[Any, dict]]:
        """``(result, figures)`` of each job (:func:`metered`); the first failed job's error (in job
        order) is raised once every job has finished, as the run's own process would have raised it."""
        from multiprocessing.connection import wait

        waiting, idle, busy, replies = list(enumerate(jobs)), list(range(len(self.pipes))), {}, {}
        while waiting or busy:
            while waiting and idle:
                worker, (index, job) = idle.pop(0), waiting.pop(0)
                started(index)
                try:
                    self.pipes[worker].send((task, job))
                except OSError:  # BrokenPipeError: it was dead already
                    raise self.died(worker, task) from None
                busy[worker] = index
            ready = wait([self.pipes[w] for w in busy])
            for worker in [w for w in busy if self.pipes[w] in ready]:
                try:
                    replies[busy.pop(worker)] = self.pipes[worker].recv()
                except (EOFError, OSError):  # OSError: reset, when it died with our job unread
                    raise self.died(worker, task) from None
                idle.append(worker)
        for index in range(len(jobs)):
            if replies[index][0] == "failed":
                _, error, where = replies[index]
                raise error from WorkerTraceback(where)
        return [replies[index][1] for index in range(len(jobs))]

    def died(self, worker: int, task: str) -> WorkerDied:
        self.processes[worker].join()
        return WorkerDied(f"the worker on {self.devices[worker]} died during a {task} job (exit code "
                          f"{self.processes[worker].exitcode}; a negative code is the signal that ended it)")

    def close(self) -> None:
        """Stop every worker now: idle ones hold nothing, busy ones only a candidate being written
        (under a temporary name; a resumed run builds or scores it again)."""
        for process in self.processes:
            process.terminate()
        for process, pipe in zip(self.processes, self.pipes):
            process.join()
            pipe.close()


class CandidateWorkers:
    """Runs a node's candidate jobs: in the run's own process with ``workers = 1``, else in the
    worker processes, started on first use and stopped by :meth:`close`."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.pool: WorkerPool | None = None

    def run(self, task: str, jobs: list[dict],
            started: Callable[[int], None] = lambda index: None) -> Iterable[tuple[Any, dict]]:
        """``(result, figures)`` per job (:func:`metered`), in job order."""
        if self.ctx.options.workers == 1:  # lazily, so each result is recorded before the next job
            return (self.inline(task, index, job, started) for index, job in enumerate(jobs))
        if self.pool is None:
            self.pool = WorkerPool(self.ctx.options, threads=self.threads())
        try:
            return self.pool.run(task, jobs, started)
        except WorkerDied:
            self.close()  # the others may be mid-job: a later call starts afresh
            raise

    def inline(self, task: str, index: int, job: dict, started: Callable[[int], None]) -> tuple[Any, dict]:
        started(index)
        with torch_threads(self.ctx.options.candidate_threads):
            return metered(self.ctx, task, job)

    def threads(self) -> int:
        """Each worker's torch threads: those one process would build and score a candidate with
        (the refit's sums round differently with another count, e.g. 1 vs 2 on the shared model)."""
        options = self.ctx.options
        threads = options.candidate_threads or torch.get_num_threads()
        if options.device == "cpu" and options.workers * threads > (os.cpu_count() or 1):
            self.ctx.reporter.warn(f"{options.workers} workers x {threads} threads on {os.cpu_count()} "
                                   "cores wait on each other: --candidate-threads sets the threads per "
                                   "worker (and per candidate with one worker; results follow it)")
        return threads

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
