"""The LangGraph controller: profile -> plan -> build -> evaluate -> decide -> (reflect) -> loop.

Graph state is small JSON (numbers, paths, records); tensors live in the model cache of the
:class:`~agent_prune.agent.states.ModelStates` and in the checkpoint store. Every node's result is
checkpointed by ``SqliteSaver`` in ``RUN_DIR/state.sqlite``, so ``resume`` re-enters the graph at the
node that was running when the process died; nodes are written to be safely re-run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypedDict

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

from agent_prune.agent.nodes import LoopNodes
from agent_prune.agent.runtime import RunContext

THREAD = {"configurable": {"thread_id": "run"}}


class RunState(TypedDict, total=False):
    status: str  # running | target_reached | max_iterations | no_acceptable_step | done
    iteration: int  # planner proposals made so far
    current: dict  # last good step: {"step", "dir", "sparsity", "params", "record"}
    dense: dict  # {"dir", "params", "prunable", "record"}
    profile_path: str
    budget: dict  # {"params", "fraction", "scale"}
    proposal: dict | None
    planner_status: str
    candidates: list[dict]
    decision: dict | None
    history: list[dict]  # accepted steps
    reflections: list[str]
    rejected_layers: list[int]
    rejections: int  # consecutive
    step_scale: float
    final: dict


def node_iteration(name: str, state: dict, update: dict) -> int | None:
    """The iteration a node works for: ``plan`` starts one and ``profile`` prepares the next, so the
    breakdown per iteration adds up; ``start`` and ``finish`` belong to none."""
    if name in ("start", "finish"):
        return None
    iteration = update.get("iteration", state.get("iteration", 0))
    return iteration + 1 if name == "profile" else iteration


def measured(ctx: RunContext, name: str, node: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """``node`` writing a ``node`` trace record with its wall time and peak memory."""

    def run(state: dict) -> dict:
        with ctx.trace.measure("node", node=name) as fields:
            update = node(state)
            fields["iteration"] = node_iteration(name, state, update)
        return update

    return run


def build_graph(ctx: RunContext) -> StateGraph:
    nodes = LoopNodes(ctx)
    graph = StateGraph(RunState)
    for name in ("start", "profile", "plan", "build", "evaluate", "decide", "reflect", "finish"):
        graph.add_node(name, measured(ctx, name, getattr(nodes, name)))
    graph.add_edge(START, "start")
    graph.add_conditional_edges("start", nodes.route_after_accept, ["profile", "finish"])
    graph.add_edge("profile", "plan")
    graph.add_edge("plan", "build")
    graph.add_edge("build", "evaluate")
    graph.add_edge("evaluate", "decide")
    graph.add_conditional_edges("decide", nodes.route_after_decide, ["profile", "reflect", "finish"])
    graph.add_conditional_edges("reflect", nodes.route_after_reflect, ["plan", "finish"])
    graph.add_edge("finish", END)
    return graph


def open_checkpointer(ctx: RunContext) -> SqliteSaver:
    conn = sqlite3.connect(ctx.run_dir / "state.sqlite", check_same_thread=False)
    return SqliteSaver(conn)


def run_graph(ctx: RunContext, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the loop to the end and return the final state."""
    saver = open_checkpointer(ctx)
    try:
        app = build_graph(ctx).compile(checkpointer=saver)
        config = {**THREAD, "recursion_limit": 20 + 8 * ctx.options.max_iterations}
        snapshot = app.get_state(config)
        # A node that finished just before the process died leaves its writes pending on the last
        # checkpoint: then ``next`` is empty but ``tasks`` is not, and invoke(None) applies them.
        if resume and (snapshot.next or snapshot.tasks):
            ctx.trace.event("resume", pending=list(snapshot.next) or [t.name for t in snapshot.tasks])
            app.invoke(None, config)
        elif not snapshot.values:  # a fresh run, or one that died before its first checkpoint
            app.invoke({}, config)
        return dict(app.get_state(config).values)
    finally:  # also after Ctrl-C, SIGTERM or a crash: no worker outlives the run's process
        ctx.workers.close()
        saver.conn.close()
