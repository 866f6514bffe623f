"""Where a run's time and memory went, from the ``node``, ``phase`` and candidate records of its trace.

``node`` records (one per graph node run, written by ``agent.graph.measured``) add up to the run's
wall time, less what LangGraph's checkpointing takes between nodes; ``phase`` records split the
``start`` and ``finish`` nodes (model load, dense scoring, export, test-protocol evaluation, speed);
``candidate_built`` and ``candidate_scored`` records split the build and evaluate nodes.
Peaks are per record (see ``agent.meter``): the largest of them is the run's peak. CPU seconds and
minor page faults are the run process's own (traces written before they were measured show none).
"""

from __future__ import annotations

from collections import defaultdict

NODE_ORDER = ("start", "profile", "plan", "build", "evaluate", "decide", "reflect", "finish")


def _peak(records: list[dict]) -> float:
    return max((r.get("peak_rss_mb", 0.0) for r in records), default=0.0)


def _cpu(records: list[dict]) -> dict:
    """Summed CPU user and system seconds and minor page faults; None unless every record has them
    (a run resumed across versions would otherwise show a partial sum)."""
    if not records or not all("cpu_sys_s" in r for r in records):
        return {"cpu_user_s": None, "cpu_sys_s": None, "minor_faults": None}
    return {"cpu_user_s": round(sum(r["cpu_user_s"] for r in records), 1),
            "cpu_sys_s": round(sum(r["cpu_sys_s"] for r in records), 1),
            "minor_faults": sum(r["minor_faults"] for r in records)}


def _cpu_cells(row: dict) -> str:
    if row["cpu_sys_s"] is None:
        return "| - | - | - |"
    return f"| {row['cpu_user_s']:.0f} | {row['cpu_sys_s']:.0f} | {row['minor_faults'] / 1e6:.1f} |"


def node_rows(records: list[dict]) -> list[dict]:
    """Per node name: runs, total and mean seconds, share of all node time, largest peak RSS."""
    nodes = [r for r in records if r["event"] == "node"]
    total = sum(r["duration_s"] for r in nodes) or 1.0
    grouped: dict[str, list[dict]] = defaultdict(list)
    for record in nodes:
        grouped[record["node"]].append(record)
    order = sorted(grouped, key=lambda n: NODE_ORDER.index(n) if n in NODE_ORDER else len(NODE_ORDER))
    rows = []
    for name in order:
        runs = grouped[name]
        seconds = sum(r["duration_s"] for r in runs)
        rows.append({"node": name, "runs": len(runs), "seconds": round(seconds, 1),
                     "mean_s": round(seconds / len(runs), 1), "share": round(seconds / total, 3),
                     "peak_rss_mb": _peak(runs), **_cpu(runs)})
    return rows


def iteration_rows(records: list[dict]) -> list[dict]:
    """Per loop iteration: seconds per node, total seconds, largest peak RSS, and the decision."""
    grouped: dict[int, list[dict]] = defaultdict(list)
    decisions: dict[int, dict] = {}
    for record in records:
        if record["event"] == "node" and record.get("iteration") is not None:
            grouped[record["iteration"]].append(record)
        elif record["event"] == "decision":
            decisions[record["iteration"]] = record
    rows = []
    for iteration in sorted(grouped):
        runs = grouped[iteration]
        by_node: dict[str, float] = defaultdict(float)
        for record in runs:
            by_node[record["node"]] += record["duration_s"]
        decision = decisions.get(iteration, {})
        rows.append({"iteration": iteration, "seconds": round(sum(by_node.values()), 1),
                     "nodes": {k: round(v, 1) for k, v in by_node.items()}, "peak_rss_mb": _peak(runs),
                     "accepted": decision.get("accepted"), "branch": decision.get("branch")})
    return rows


def _figures(record: dict) -> dict:
    """One measured stretch's seconds, peak and end RSS, CPU time and faults."""
    return {"seconds": round(record["duration_s"], 1), "peak_rss_mb": record.get("peak_rss_mb"),
            "rss_mb": record.get("rss_mb"), **_cpu([record])}


def phase_rows(records: list[dict]) -> list[dict]:
    return [{"phase": r["phase"], **_figures(r)} for r in records if r["event"] == "phase"]


def candidate_rows(records: list[dict]) -> list[dict]:
    """Per candidate built or scored: its job's seconds, peak and end RSS, CPU time and faults (the
    build and evaluate nodes' shares; with ``--workers`` the worker process's own figures)."""
    jobs = {"candidate_built": "build", "candidate_scored": "score"}
    return [{"iteration": r["iteration"], "job": jobs[r["event"]], "branch": r["branch"], **_figures(r)}
            for r in records if r["event"] in jobs]


def breakdown_markdown(records: list[dict]) -> str:
    """The four tables (per node, per iteration, per candidate, per phase) as GitHub markdown."""
    nodes = node_rows(records)
    if not nodes:
        return "no `node` records: the run is still in its first node, or predates per-node measurement\n"
    lines = ["| node | runs | seconds | mean s | share | peak RSS MiB | CPU user s | CPU sys s "
             "| minor faults (M) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['node']} | {r['runs']} | {r['seconds']:.1f} | {r['mean_s']:.1f} | {r['share']:.1%} "
              f"| {r['peak_rss_mb']:.0f} " + _cpu_cells(r) for r in nodes]
    total = sum(r["seconds"] for r in nodes)
    lines += [f"| all nodes | {sum(r['runs'] for r in nodes)} | {total:.1f} | | 100% "
              f"| {max(r['peak_rss_mb'] for r in nodes):.0f} "
              + _cpu_cells(_cpu([r for r in records if r["event"] == "node"])), ""]
    names = [n for n in NODE_ORDER[1:-1] if any(n == r["node"] for r in nodes)]
    lines += ["| iteration | " + " | ".join(names) + " | seconds | peak RSS MiB | decision |",
              "|---:|" + "---:|" * (len(names) + 2) + "---|"]
    for row in iteration_rows(records):
        decision = "-" if row["accepted"] is None else (
            f"accepted {row['branch']}" if row["accepted"] else "rolled back")
        cells = [f"{row['nodes'].get(n, 0.0):.1f}" for n in names]
        lines.append(f"| {row['iteration']} | " + " | ".join(cells)
                     + f" | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {decision} |")
    candidates = [r for r in candidate_rows(records) if r["peak_rss_mb"] is not None]
    if candidates:  # traces written before candidates were metered have their seconds alone
        lines += ["", "| iteration | candidate | job | seconds | peak RSS MiB | RSS after MiB | CPU user s "
                      "| CPU sys s | minor faults (M) |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['iteration']} | {r['branch']} | {r['job']} | {r['seconds']:.1f} "
                  f"| {r['peak_rss_mb']:.0f} | {r['rss_mb'] or 0:.0f} " + _cpu_cells(r) for r in candidates]
    phases = phase_rows(records)
    if phases:
        lines += ["", "| phase (inside start / finish) | seconds | peak RSS MiB | RSS after MiB | CPU user s "
                      "| CPU sys s | minor faults (M) |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['phase']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_mb'] or 0:.0f} "
                  + _cpu_cells(r) for r in phases]
    return "\n".join(lines) + "\n"
