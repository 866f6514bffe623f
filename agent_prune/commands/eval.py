"""``agent-prune eval``: perplexity, FreebaseQA probes and multiple-choice tasks, each with error bars."""

from __future__ import annotations

from rich.table import Table

from agent_prune.commands.common import (
    RichProgress,
    add_data_args,
    add_model_args,
    add_output_args,
    print_json,
    stderr_console,
)
from agent_prune.data.sources import resolve_data_dir
from agent_prune.errors import InputError
from agent_prune.evaluation.task_names import TASKS, parse_tasks

# metric name -> how the table shows it (label, scale, digits)
DISPLAY = {
    "perplexity": ("perplexity", 1.0, 2),
    "exact_match": ("exact match %", 100.0, 1),
    "gold_loglik": ("gold log-lik (nats)", 1.0, 2),
    "mc_accuracy": ("MC accuracy %", 100.0, 1),
    "mc_margin": ("MC margin (nats)", 1.0, 2),
    "acc": ("acc %", 100.0, 1),
    "acc_norm": ("acc_norm %", 100.0, 1),
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model (perplexity, knowledge, multiple choice)",
                                   description=__doc__)
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument("--tasks", default="wikitext2", help=f"comma-separated: {', '.join(TASKS)}")
    parser.add_argument("--seqlen", type=int, default=512, help="WikiText-2 window length (default 512)")
    parser.add_argument("--windows", type=int, default=None, help="use the first N WikiText-2 windows")
    parser.add_argument("--limit", type=int, default=None, help="use the first N items of other tasks")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--per-item", action="store_true", help="include per-item vectors in --json output")
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="float32",
                        help="what the forwards multiply in: float32 (default) as loaded, or a bfloat16 "
                             "copy with MLP widths padded to shared shapes, as 'agent-prune run "
                             "--report-dtype compute' evaluates (auto: bfloat16 for float32 weights "
                             "where the CPU or GPU has bfloat16 units)")
    add_output_args(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    tasks = parse_tasks(args.tasks)
    for flag in ("seqlen", "windows", "limit", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    data_dir = resolve_data_dir(args.data_dir)
    from agent_prune.evaluation.harness import run_tasks  # torch is imported only past flag checks
    from agent_prune.models.loading import load_model
    from agent_prune.models.precision import compute_dtype, evaluated_in, resolve_compute_dtype

    with stderr_console.status(f"loading {args.model}", spinner="dots") if not args.quiet else _null():
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    dtype = resolve_compute_dtype(args.compute_dtype, args.device, args.dtype)
    with RichProgress(quiet=args.quiet) as progress, compute_dtype(dtype), \
            evaluated_in(loaded.model, owned=True) as model:
        results = run_tasks(model, loaded.tokenizer, tasks, data_dir, seqlen=args.seqlen,
                            windows=args.windows, limit=args.limit, batch_size=args.batch_size,
                            progress=progress, per_item=args.per_item)
    if not args.quiet or not args.json:
        stderr_console.print(results_table(results, loaded.source.display))
    if args.json:
        print_json(results)
    return 0


def results_table(results: dict[str, dict], title: str) -> Table:
    table = Table(title=f"evaluation of {title}", title_justify="left")
    for column in ("task", "metric", "value", "± se", "n", "protocol"):
        table.add_column(column, justify="right" if column in ("value", "± se", "n") else "left")
    for task, entry in results.items():
        n = entry.get("windows") or entry.get("questions") or entry.get("items")
        setting = (f"seqlen {entry['seqlen']}, {entry['windows']} windows, {entry['tokens_per_s']:.0f} tok/s"
                   if task == "wikitext2" else f"{n} items")
        for metric, (label, scale, digits) in DISPLAY.items():
            if metric in entry:
                table.add_row(task, label, f"{entry[metric] * scale:.{digits}f}",
                              f"{entry[metric + '_se'] * scale:.{digits}f}", str(n), setting)
    return table


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
