"""agent-prune against classic structured pruning at the same sizes, one command (issue 8).

    nice python -m bench.compare --data-dir ../shared/data \\
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

Prunes to each target (default 10/20/30% of prunable parameters) with ShortGPT, uniform Wanda-sp,
the loop's L2 and Taylor width pruners once (global allocation), the MoP fixed rule and agent-prune
(heuristic planner; ``--llm-planner SPEC`` adds a row), each in its own worker process; then
replays, exports, reloads and evaluates every result with one protocol, measures speed per target
in one process, and writes the JSON, the doc section and the plot.

Resumable: finished pruning runs (state directories under ``--work``) and evaluated rows (in the
JSON) are reused; rerunning the command after a crash redoes only what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from agent_prune.agent.options import RunOptions
from agent_prune.io import atomic_write_json, read_json
from bench.compare import report
from bench.compare.evaluate import Protocol
from bench.compare.prune import ONE_SHOT, Calibration

ONE_SHOT_METHODS = tuple(ONE_SHOT)
ROOT = Path(__file__).resolve().parents[2]
REACH = 0.02  # a loop step within 2 points of a target stands for it (the table shows its sparsity)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model (.gguf, HF folder)")
    p.add_argument("--data-dir", required=True, help="local data directory (WikiText-2, C4, FreebaseQA, ARC)")
    p.add_argument("--targets", default="0.1,0.2,0.3", help="comma list of sparsity targets")
    p.add_argument("--methods", default="shortgpt,wanda_sp,l2_global,taylor_global,mop,agent",
                   help="comma list of methods")
    p.add_argument("--one-shot-recovery", default="none,reconstruct",
                   help="recovery settings for the one-shot methods (none, reconstruct)")
    p.add_argument("--loop-recovery", default="reconstruct", choices=("none", "reconstruct"),
                   help="recovery after each step of MoP and agent-prune")
    p.add_argument("--planner", default="heuristic", help="agent-prune planner of the main agent row")
    p.add_argument("--llm-planner", help="an extra agent-prune row with this planner "
                                         "(openai:MODEL@URL or hf:PATH)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--calib-samples", type=int, default=RunOptions.model_fields["calib_samples"].default,
                   help="C4 calibration windows for every method (the agent loop's default)")
    p.add_argument("--calib-seqlen", type=int, default=RunOptions.model_fields["calib_seqlen"].default,
                   help="tokens per calibration window for every method (the agent loop's default)")
    p.add_argument("--agent-option", action="append", default=[], metavar="KEY=JSON",
                   help="extra agent-prune RunOptions field, e.g. eval_windows=4 (repeatable)")
    p.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows")
    p.add_argument("--freebaseqa", type=int, default=300, help="FreebaseQA dev questions")
    p.add_argument("--arc", type=int, default=300, help="ARC-Easy validation items")
    p.add_argument("--partial-loops", action="store_true",
                   help="do not start or resume the MoP / agent runs: use the steps they have so far")
    p.add_argument("--jobs", type=int, default=1, help="pruning worker processes at a time")
    p.add_argument("--eval-jobs", type=int, default=1, help="evaluation worker processes at a time")
    p.add_argument("--cached-evals-only", action="store_true",
                   help="prune and evaluate nothing new: rows whose pruned state or evaluation is "
                        "not on disk yet are left out")
    p.add_argument("--no-speed", action="store_true", help="skip the throughput measurement")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where every worker prunes, calibrates and evaluates, and where speed is "
                        "measured (exports and replays stay on the CPU)")
    p.add_argument("--work", default="runs/compare", help="pruned states, runs and exports (large)")
    p.add_argument("--json-out", default="bench/results/compare.json")
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file whose section is rewritten")
    p.add_argument("--plot", default="docs/compare.png")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    work, out = Path(args.work), Path(args.json_out)
    targets = [float(t) for t in args.targets.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    protocol = Protocol(seqlen=args.seqlen, windows=args.windows, freebaseqa=args.freebaseqa,
                        arc_easy=args.arc)
    result = read_json(out) if out.is_file() else {}
    if result.get("protocol", {}).get("eval") != protocol.model_dump():
        result = {}  # another protocol: nothing cached applies
    calibration = Calibration(args.calib_samples, args.calib_seqlen)
    result.update(command="python -m bench.compare " + shlex.join(argv),
                  protocol=_protocol(protocol, calibration),
                  machine=_machine(result.get("machine"), args.device))
    result.setdefault("rows", {})
    jobs = plan_rows(args, targets, methods, work)
    if not args.cached_evals_only:
        prune_and_evaluate_one_shots(args, result, jobs, targets, work, protocol, out)
    rows = {row["id"]: row for job in jobs for row in job.rows(targets)}
    for rid in [rid for rid, row in result["rows"].items() if row["method"] in methods
                and row["target"] in targets and rid not in rows]:
        del result["rows"][rid]  # an earlier invocation's row this one no longer produces (unreached)
    result["unreached"] = [f"{job.dir.name} at {t:g}" for job in jobs if isinstance(job, LoopJob)
                           for t in targets if not any(r["target"] == t for r in job.rows([t]))]
    evaluate_all(args, result, rows, work, protocol, out)
    if not args.no_speed:
        measure_speeds(result, targets, work, args.device)
    result["verdicts"] = paired_verdicts(result, work)
    result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["invocations"] = [*result.get("invocations", []), {
        "command": result["command"], "seconds": round(time.perf_counter() - started, 1),
        "finished": result["finished"], "load_average_at_end": os.getloadavg()}]
    result["wall_seconds"] = round(sum(i["seconds"] for i in result["invocations"]), 1)
    atomic_write_json(out, result)
    write_outputs(args, result)
    print(report.tables(result))
    return result


# ---- pruning jobs ---------------------------------------------------------------------------------
def prune_and_evaluate_one_shots(args, result: dict, jobs: list, targets: list[float], work: Path,
                                 protocol: Protocol, out: Path) -> None:
    """Run every pruning task, ``--jobs`` at a time; evaluate the one-shot rows while the loops run.

    The loop runs (MoP, agent-prune) are the long poles, so they start first and the one-shot jobs
    fill the other slots; once those are done, the dense model and the one-shot rows are evaluated
    (``--eval-jobs`` workers) while the loops go on.
    """
    loops = [job for job in jobs if isinstance(job, LoopJob)]
    one_shots = [job for job in jobs if not isinstance(job, LoopJob)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = [pool.submit(task) for job in loops for task in job.tasks(args)]
        for future in [pool.submit(task) for job in one_shots for task in job.tasks(args)]:
            future.result()
        evaluate_all(args, result, {row["id"]: row for job in one_shots for row in job.rows(targets)},
                     work, protocol, out)
        for future in running:
            future.result()


def worker(args, job: str, out: Path, target: float, **extra) -> None:
    command = [sys.executable, "-m", "bench.compare.worker", job, "--model", args.model,
               "--data-dir", args.data_dir, "--out", str(out), "--target", str(target),
               "--device", args.device]
    extra = {"seqlen": args.seqlen, "calib-samples": args.calib_samples, "calib-seqlen": args.calib_seqlen,
             **extra}
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    print("+ " + shlex.join(command[1:]), file=sys.stderr, flush=True)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run(command, check=True, env=env)


class OneShotJob:
    def __init__(self, method: str, recovery: str, work: Path):
        self.method, self.recovery, self.work = method, recovery, work

    def state(self, target: float) -> Path:
        return self.work / "states" / f"{self.method}-{self.recovery}-{target:g}"

    def tasks(self, args) -> list:
        """One worker call per target not yet pruned (and not being pruned by a live worker)."""
        todo = []
        for target in [float(t) for t in args.targets.split(",")]:
            state = self.state(target)
            if (state / "record.json").is_file() or _running(state):
                continue
            todo.append(lambda state=state, target=target: worker(
                args, "oneshot", state, target, method=self.method, recovery=self.recovery))
        return todo

    def rows(self, targets: list[float]) -> list[dict]:
        rows = []
        for target in targets:
            if not (self.state(target) / "record.json").is_file():
                continue
            record = read_json(self.state(target) / "record.json")
            rows.append({"id": f"{self.method}/{self.recovery}/{target:g}", "method": self.method,
                         "recovery": self.recovery, "target": target, "state": str(self.state(target)),
                         "cost": record["cost"], "actions": record.get("actions")})
        return rows


class LoopJob:
    """MoP or agent-prune: one run; each of its targets takes the run's nearest step.

    MoP's fixed rule takes the same steps whatever the target, so one run to the largest target
    serves them all. agent-prune's planner sizes its steps from the target, so each target gets its
    own run (``target``), the one a user would start with ``--target-sparsity``.
    """

    def __init__(self, method: str, recovery: str, work: Path, planner: str | None = None,
                 target: float | None = None):
        self.method, self.recovery, self.planner, self.target = method, recovery, planner, target
        slug = "" if planner is None else "-" + "".join(c if c.isalnum() else "_" for c in planner)[:40]
        self.dir = work / f"{method}{slug}-{recovery}{'' if target is None else f'-{target:g}'}"

    def tasks(self, args) -> list:
        target = self.target if self.target is not None else max(float(t) for t in args.targets.split(","))
        if args.partial_loops:
            return []
        if _running(self.dir):
            raise SystemExit(f"error: {self.dir} is being pruned by another process (wait for it, or "
                             "pass --partial-loops to use its steps so far)")
        if self.method == "mop":
            from bench.compare.mop import saved_steps

            steps = saved_steps(self.dir) if self.dir.is_dir() else []
            if steps and steps[-1]["sparsity"] >= target - 0.005:
                return []
            return [lambda: worker(args, "mop", self.dir, target, recovery=self.recovery)]
        if (self.dir / "summary.json").is_file():
            return []
        options = {"final_eval": {"freebaseqa_limit": args.freebaseqa},
                   **dict(_option(item) for item in args.agent_option)}
        return [lambda: worker(args, "agent", self.dir, target, recovery=self.recovery, planner=self.planner,
                               **{"agent-options": json.dumps(options)})]

    def steps(self) -> list[dict]:
        if self.method == "mop":
            from bench.compare.mop import saved_steps

            return saved_steps(self.dir)
        from bench.compare.agent_run import accepted_steps

        return [s | {"dir": str(self.dir / "checkpoints" / f"step-{s['step']:04d}")}
                for s in accepted_steps(self.dir) if s["step"] > 0]

    def rows(self, targets: list[float]) -> list[dict]:
        from bench.compare.agent_run import COST_FILE, nearest_step, run_peak_mib

        steps = self.steps()
        invocations = read_json(self.dir / COST_FILE) if (self.dir / COST_FILE).is_file() else []
        peaks = [c.get("peak_rss_mib", 0.0) for c in invocations]
        live = _live_peak_mib(self.dir)
        if live:  # the loop resets VmHWM at each node: its trace holds the earlier nodes' peaks
            live = max(live, run_peak_mib(self.dir))
        peak = max([*peaks, *([live] if live else [])], default=None)
        run_seconds = sum(c.get("seconds", 0.0) for c in invocations)
        status = "still running" if live else f"whole run {run_seconds / 60:.0f} min wall"
        rows = []
        for target in targets if self.target is None else [t for t in targets if t == self.target]:
            step = nearest_step(steps, target) if steps else None
            if step is None or abs(step["sparsity"] - target) > REACH:
                continue  # the run has not (yet) reached this target: no row
            key = self.method if self.planner is None else f"{self.method}:{self.planner}"
            rows.append({
                "id": f"{key}/{self.recovery}/{target:g}", "method": self.method, "planner": self.planner,
                "recovery": self.recovery, "target": target, "state": step["dir"], "step": step["step"],
                "step_note": f"step {step['step']} ({step['branch']}) of one run ({status})",
                "cost": {"seconds": step["seconds_from_start"], "peak_rss_mib": peak,
                         "run_seconds": round(run_seconds, 1)},
                "path": [{k: s.get(k) for k in ("step", "branch", "sparsity", "summary")} for s in steps
                         if s["step"] <= step["step"]],
            })
        return rows


def _running(directory: Path) -> bool:
    """True while a live worker holds ``directory`` (a second worker there would corrupt it)."""
    from bench.compare.cost import LOCK_FILE

    lock = directory / LOCK_FILE
    return lock.is_file() and Path(f"/proc/{int(lock.read_text().split()[0])}").exists()


def _live_peak_mib(directory: Path) -> float | None:
    """Peak RSS so far (VmHWM) of the live worker holding ``directory``, if any."""
    from bench.compare.cost import LOCK_FILE

    if not _running(directory):
        return None
    status = Path(f"/proc/{int((directory / LOCK_FILE).read_text().split()[0])}/status")
    line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), None)
    return round(int(line.split()[1]) / 1024, 1) if line else None


def _option(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def plan_rows(args, targets: list[float], methods: list[str], work: Path) -> list:
    jobs: list = []
    for method in methods:
        if method in ONE_SHOT_METHODS:
            recoveries = [r.strip() for r in args.one_shot_recovery.split(",") if r.strip()]
            jobs += [OneShotJob(method, recovery, work) for recovery in recoveries]
        elif method == "mop":
            jobs.append(LoopJob("mop", args.loop_recovery, work))
        elif method == "agent":
            planners = [args.planner, *([args.llm_planner] if args.llm_planner else [])]
            jobs += [LoopJob("agent", args.loop_recovery, work, planner=planner, target=target)
                     for planner in planners for target in targets]
        else:
            raise SystemExit(f"error: unknown method {method} (use {', '.join(ONE_SHOT_METHODS)}, "
                             "mop, agent)")
    return jobs


# ---- evaluation, speed, outputs -------------------------------------------------------------------
def evaluate_all(args, result: dict, rows: dict, work: Path, protocol: Protocol, out: Path) -> None:
    """Evaluate every row not yet evaluated on its current state, ``--eval-jobs`` workers at a time."""
    pending = [] if result.get("dense", {}).get("eval") else [("dense", None)]
    pending += [(rid, row) for rid, row in rows.items()
                if result["rows"].get(rid, {}).get("state") != row["state"]
                or not result["rows"][rid].get("eval")]
    if args.cached_evals_only:  # leave out rows whose evaluation has not finished yet
        skipped = [rid for rid, row in pending if not _evaluated(work / "evals" / _slug(rid),
                                                                  row and row["state"], protocol)]
        pending = [(rid, row) for rid, row in pending if rid not in skipped]
        for rid in skipped:
            rows.pop(rid, None)
            result["rows"].pop(rid, None)
        result["not_evaluated"] = skipped

    def evaluate(item: tuple[str, dict | None]) -> tuple[str, dict | None, dict]:
        rid, row = item
        target = work / "evals" / _slug(rid)
        if not _evaluated(target, row and row["state"], protocol):
            extra = {"state": row["state"]} if row else {}
            worker(args, "evaluate", target, 0.0, **extra, windows=args.windows,
                   freebaseqa=args.freebaseqa, arc=args.arc)
        return rid, row, read_json(target / "eval.json")

    with ThreadPoolExecutor(max_workers=args.eval_jobs) as pool:
        for rid, row, evaluated in pool.map(evaluate, pending):
            entry = {**(row or {"id": "dense", "method": "dense"}), "export": evaluated["export"],
                     "eval": evaluated["eval"]}
            if rid == "dense":
                result["dense"] = entry
            else:
                result["rows"][rid] = entry
            atomic_write_json(out, result)
    for rid, row in rows.items():  # costs and step notes can change without a new evaluation
        result["rows"][rid] = {**result["rows"][rid], **{k: v for k, v in row.items() if k != "eval"}}


def _evaluated(target: Path, state: str | None, protocol: Protocol) -> bool:
    if not (target / "eval.json").is_file():
        return False
    done = read_json(target / "eval.json")
    return done.get("state") == state and done.get("protocol") == protocol.model_dump()


def _slug(rid: str) -> str:
    return rid.replace("/", "-").replace(":", "_")


def items_path(work: Path, rid: str) -> Path:
    return work / "evals" / _slug(rid) / "items.json"


def paired_verdicts(result: dict, work: Path, z: float = 2.0) -> list[dict]:
    """Each agent-prune row against the best baseline row of its target, per metric, paired over items."""
    from agent_prune.evaluation.stats import compare_paired
    from bench.compare.evaluate import PAIRED

    verdicts = []
    rows = result["rows"]
    for rid, row in rows.items():
        if row["method"] != "agent":
            continue
        baselines = [b for b in rows.values() if b["method"] != "agent" and b["target"] == row["target"]]
        for task, (key, higher) in PAIRED.items():
            metric = {"wikitext2": "perplexity", "freebaseqa": "mc_accuracy", "arc_easy": "acc"}[task]
            sign = 1 if higher else -1
            best = max(baselines, key=lambda b: sign * b["eval"]["tasks"][task][metric], default=None)
            if best is None:
                continue
            a = read_json(items_path(work, rid))[task]
            b = read_json(items_path(work, best["id"]))[task]
            comparison = compare_paired(a, b, metric=key, higher_is_better=higher, z_threshold=z)
            verdicts.append({"target": row["target"], "agent": rid, "task": task, "metric": metric,
                             "agent_value": row["eval"]["tasks"][task][metric], "best_baseline": best["id"],
                             "baseline_value": best["eval"]["tasks"][task][metric],
                             "paired_difference": comparison.difference.value,
                             "paired_se": comparison.difference.se, "z": round(comparison.z, 2),
                             "verdict": {"a": "agent-prune better", "b": "baseline better",
                                         "tie": "tie (|z| <= 2)"}[comparison.verdict]})
    return verdicts


def measure_speeds(result: dict, targets: list[float], work: Path, device: str = "cpu") -> None:
    from bench.compare.evaluate import speed_of_exports

    speed = {}
    for target in targets:
        exports = {"dense": Path(result["dense"]["export"]["export"])}
        exports |= {rid: Path(row["export"]["export"]) for rid, row in result["rows"].items()
                    if row["target"] == target}
        print(f"measuring speed at {target:.0%} ({len(exports)} models)", file=sys.stderr, flush=True)
        speed[f"{target:g}"] = speed_of_exports(exports, device)
    speed["dense"] = {"dense": speed[f"{targets[0]:g}"]["dense"]}
    result["speed"] = speed


def _protocol(protocol: Protocol, calibration) -> dict:
    return {"eval": protocol.model_dump(), "eval_text": protocol.describe(),
            "calibration": calibration.describe(),
            "speed": "agent_prune.evaluation.speed.measure_speed defaults, every model of one target "
                     "(and the dense model) interleaved in one process"}


def _machine(previous: dict | None, device: str = "cpu") -> dict:
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": (previous or {}).get("load_average_at_start", os.getloadavg()),
            "load_average_now": os.getloadavg(),
            "date": datetime.now(timezone.utc).date().isoformat(), "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def write_outputs(args, result: dict) -> None:
    report.plot(result, Path(args.plot))
    report.write_doc(Path(args.doc), report.section(result, Path(args.plot), Path(args.doc)))


if __name__ == "__main__":
    main()
