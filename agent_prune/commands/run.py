"""``agent-prune run``: prune a model to a target sparsity with the agent loop, then export it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from agent_prune.commands.common import add_data_args, comma_list, print_json
from agent_prune.commands.config import load_config_file, validation_message
from agent_prune.errors import EXIT_OK, EXIT_TARGET_NOT_REACHED, InputError
from agent_prune.models.formats import add_format_args

EXAMPLES = """examples:
  agent-prune run --model ../shared/models/smollm2-135m-instruct --data-dir ../shared/data \\
      --target-sparsity 0.2 --planner heuristic --out runs/heuristic-20
  agent-prune run --config run.toml --planner openai:gpt-4o-mini
  agent-prune run --model M --target-sparsity 0.3 --out runs/r \
      --planner openai:qwen2.5:7b@http://localhost:11434/v1
"""

# flag -> RunOptions field, for the flags that map one to one
FLAG_FIELDS = (
    "model", "out", "target_sparsity", "planner", "planner_base_url", "planner_timeout",
    "max_iterations", "max_rejections", "step_fraction", "select_by", "recovery", "heal_tokens",
    "heal_seconds", "eval_windows", "probe_limit", "kl_windows", "seqlen", "calib_samples",
    "calib_seqlen", "seed", "data_dir", "device", "dtype", "compute_dtype", "profile_gradients",
    "profile_hessians", "export_format", "export_quant",
    "width_multiple", "uniform_width", "workers", "candidate_threads", "device_map",
)
GATE_FLAGS = {"max_step_ppl_increase": float, "max_total_ppl_increase": float,
              "min_probe_accuracy_ratio": float}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="prune a model to a target sparsity with the agent loop",
        description="Profile, plan, branch (depth vs width), recover, evaluate and decide, step by "
                    "step, until the target sparsity; export the pruned model and a report.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_args(parser)
    parser.set_defaults(handler=run)


def add_run_args(parser) -> None:
    parser.add_argument("--config", help="TOML file with run options (flags override it)")
    parser.add_argument("--model", help="local HF folder, .gguf file, or hub id")
    parser.add_argument("--out", help="run directory (created; must not hold another run)")
    parser.add_argument("--target-sparsity", type=float,
                        help="fraction of prunable parameters to remove, e.g. 0.2")
    parser.add_argument("--planner", help="heuristic | openai:MODEL[@URL] | hf:PATH_OR_ID")
    parser.add_argument("--planner-base-url", help="OpenAI-compatible server URL for the planner")
    parser.add_argument("--planner-timeout", type=float, help="seconds per planner request (default 120)")
    parser.add_argument("--planner-option", action="append", metavar="KEY=VALUE", default=None,
                        help="further planner setting, repeatable: max_repairs, max_retries, "
                             "api_key_env, temperature, seed, max_tokens, structured (openai: auto|"
                             "json_schema|json_object|json_text), decoding (hf: skeleton|"
                             "constrained); see docs/planners.md")
    parser.add_argument("--max-iterations", type=int, help="planner proposals at most (default 40)")
    parser.add_argument("--max-rejections", type=int,
                        help="consecutive rolled-back steps before stopping (default 3)")
    parser.add_argument("--step-fraction", type=float,
                        help="step budget as a fraction of prunable params (default: three layers' worth; "
                             "a remainder under half a step joins the last step)")
    parser.add_argument("--branches", help="comma list of depth,width (default both)")
    parser.add_argument("--select-by", choices=("perplexity", "kl"), help="candidate choice signal")
    parser.add_argument("--alternative-sizings",
                        help="comma list of l2,fluctuation: one more width candidate a step for each, "
                             "its per-layer cuts sized by that score's global ranking; the best is kept "
                             "(default fluctuation; none: one width candidate, a build and a scoring "
                             "less a step)")
    parser.add_argument("--recovery", choices=("none", "reconstruct", "distill"),
                        help="reconstruct (default): refit each cut layer's o_proj/down_proj toward "
                             "the dense sub-block on the candidate's own inputs; distill: heal each "
                             "accepted step; none: the cut alone (docs/benchmarks.md, Compensation)")
    parser.add_argument("--heal-tokens", type=int, help="distillation token budget (distill)")
    parser.add_argument("--heal-seconds", type=float, help="distillation wall-clock budget (distill)")
    parser.add_argument("--eval-windows", type=int, help="WikiText-2 validation windows per score")
    parser.add_argument("--probe-limit", type=int, help="FreebaseQA multiple-choice questions per score")
    parser.add_argument("--kl-windows", type=int, help="held-out C4 windows for KL to dense (0: off)")
    parser.add_argument("--seqlen", type=int, help="tokens per evaluation window (default 512)")
    parser.add_argument("--calib-samples", type=int,
                        help="C4 calibration windows for profiling and reconstruction (default 128)")
    parser.add_argument("--calib-seqlen", type=int,
                        help="tokens per calibration window (default 128; --seqlen sets the "
                             "evaluation windows')")
    parser.add_argument("--profile-gradients", action="store_true", default=None,
                        help="add gradient and Taylor metrics to each step's profile (the taylor "
                             "pruner needs them; doubles the profile's cost)")
    parser.add_argument("--profile-hessians", action="store_true", default=None,
                        help="add structured OBS scores to each step's profile (the obs pruner "
                             "needs them; a few seconds a layer on CPU)")
    parser.add_argument("--width-multiple", type=int, metavar="N",
                        help="every thinned layer keeps a multiple of N MLP channels (e.g. 64)")
    parser.add_argument("--uniform-width", action="store_true", default=None,
                        help="cut every layer to one MLP width and keep attention whole, so the "
                             "export loads with a stock config (vLLM, TensorRT-LLM)")
    parser.add_argument("--seed", type=int)
    for flag in GATE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=float, dest=flag,
                            help=f"gate: {flag.replace('_', ' ')}")
    parser.add_argument("--no-final-eval", action="store_true",
                        help="skip the before/after test-set evaluation at the end")
    parser.add_argument("--report-tasks", metavar="LIST",
                        help="the report's before/after measurements, a comma list of wikitext2, "
                             "freebaseqa, arc_easy, arc_challenge, csqa, mmlu, speed (default "
                             "wikitext2,freebaseqa,arc_easy,speed; config key report_tasks)")
    parser.add_argument("--report-dtype", choices=("weights", "compute"),
                        help="what the report's evaluation multiplies in: the weights as stored "
                             "(default) or the run's --compute-dtype, on a copy as candidates are "
                             "scored (about half the report's time in bfloat16; speed stays on the "
                             "weights as stored)")
    add_data_args(parser)
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--device-map", choices=("auto",),
                        help="auto: when the model does not fit --device under --max-memory (accelerate's "
                             "infer_auto_device_map), keep the decoder layers off it, in RAM or on disk "
                             "under RUN_DIR/offload, and run them one at a time (decisions and export "
                             "unchanged; no speed measurement, no --recovery distill, no GGUF export)")
    parser.add_argument("--max-memory", metavar="LIST",
                        help="caps per device for --device-map auto, accelerate's keys and sizes: "
                             "cpu=300MiB,0=20GiB (default what is free); on a CPU-only machine a cpu cap "
                             "below the model spills its layers to disk")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="build and score a step's candidates in N worker processes side by side, "
                             "each loading the model once (default 1: in the run's own process); the "
                             "decisions and the export are the same for every N")
    parser.add_argument("--worker-devices", metavar="LIST",
                        help="one device per worker, e.g. cuda:0,cuda:1 (default: all on --device)")
    parser.add_argument("--candidate-threads", type=int, metavar="N",
                        help="torch CPU threads per candidate, in each worker or in the run's process "
                             "(default every core); a run's low bits follow it, not --workers: on CPU "
                             "compare --workers 1 and 2 at the same N, e.g. 1 on 2 cores")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"),
                        help="what the loop multiplies in: profile and refit walks under torch autocast "
                             "(weights and statistics stay --dtype), candidate scoring on a bfloat16 copy; "
                             "the export and (unless --report-dtype compute) the report stay --dtype. "
                             "auto: bfloat16 for float32 weights where the CPU (AVX512-BF16, AMX) or GPU "
                             "has bfloat16 units, else float32. Default float32")
    add_format_args(parser)
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no live progress")


def options_from_args(args):
    from agent_prune.agent.options import RunOptions, report_task_settings

    values = load_config_file(args.config) if args.config else {}
    for name in FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if getattr(args, "planner_option", None):
        values["planner_options"] = {**values.get("planner_options", {}),
                                     **parse_key_values(args.planner_option)}
    if args.branches:
        values["branches"] = comma_list(args.branches)
    if getattr(args, "alternative_sizings", None):
        names = comma_list(args.alternative_sizings)
        values["alternative_sizings"] = [] if names == ["none"] else names
    if getattr(args, "max_memory", None):
        from agent_prune.models.placement import parse_max_memory

        values["max_memory"] = parse_max_memory(args.max_memory)
    if getattr(args, "worker_devices", None):
        values["worker_devices"] = comma_list(args.worker_devices)
    gates = dict(values.get("gates", {}))
    for name in GATE_FLAGS:
        if getattr(args, name, None) is not None:
            gates[name] = getattr(args, name)
    if gates:
        values["gates"] = gates
    report_tasks = values.pop("report_tasks", None)
    if getattr(args, "report_tasks", None) is not None:
        report_tasks = args.report_tasks
    if report_tasks is not None:
        values["final_eval"] = {**values.get("final_eval", {}), **report_task_settings(report_tasks)}
    if getattr(args, "report_dtype", None) is not None:
        values["final_eval"] = {**values.get("final_eval", {}), "dtype": args.report_dtype}
    if args.no_final_eval:
        values.setdefault("final_eval", {})["windows"] = 0
    for required in ("model", "out", "target_sparsity"):
        if values.get(required) is None:
            raise InputError(f"--{required.replace('_', '-')} is required",
                             "pass it as a flag or put it in the --config file")
    try:
        return RunOptions.model_validate(values)
    except ValidationError as exc:
        raise InputError(validation_message(exc), "see agent-prune run --help") from None


def parse_key_values(items: list[str]) -> dict:
    """``["max_repairs=1", "api_key_env=VLLM_KEY"]`` -> dict; JSON values (numbers, true) parsed."""
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--planner-option '{item}' is not KEY=VALUE",
                             "e.g. --planner-option max_repairs=1")
        try:
            parsed[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip().replace("-", "_")] = raw
    return parsed


def run(args) -> int:
    from agent_prune.agent.session import start_run
    from agent_prune.commands.progress import make_reporter

    options = options_from_args(args)
    run_dir = Path(options.out)
    args.resume_hint = f"agent-prune resume {run_dir}"
    reporter = make_reporter(quiet=args.quiet or args.json)
    try:
        summary = start_run(options, reporter=reporter)
    finally:
        reporter.close()
    return finish_command(summary, args)


def finish_command(summary: dict, args) -> int:
    if args.json:
        print_json(summary)
    elif not args.quiet:
        print_closing_summary(summary)
    reached = summary.get("status") == "target_reached"
    if not reached:
        print(f"target not reached: {summary.get('status')} at sparsity "
              f"{summary.get('sparsity', 0.0):.3f}", file=sys.stderr)
    return EXIT_OK if reached else EXIT_TARGET_NOT_REACHED


def print_closing_summary(summary: dict) -> None:
    """The before/after table of the report, and where the model and report are, on stderr."""
    from rich.table import Table

    from agent_prune.commands.common import stderr_console
    from agent_prune.reporting.report import before_after_rows

    final = summary.get("final") or {}
    sparsity, steps = 100 * summary.get("sparsity", 0.0), summary.get("accepted_steps", 0)
    table = Table(title=f"{summary.get('status')}: structural sparsity {sparsity:.1f}% in {steps} steps")
    for column in ("", "dense", "pruned"):
        table.add_column(column, justify="left" if not column else "right")
    for row in before_after_rows(final):
        table.add_row(*row)
    stderr_console.print(table)
    if final.get("export"):
        stderr_console.print(f"model: {final['export']}", highlight=False)
    if summary.get("report"):
        stderr_console.print(f"report: {summary['report']}", highlight=False)
    stderr_console.print(f"trace: agent-prune trace {summary.get('run_dir')}", highlight=False)
