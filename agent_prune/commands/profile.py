"""``agent-prune profile``: per-layer sensitivity of a model on C4 calibration windows.

Prints one table row per decoder layer (z-scores coloured) on stderr and writes the
:class:`~agent_prune.sensitivity.SensitivityProfile` JSON atomically to ``--out``; with
``--json`` the same JSON object goes to stdout.
"""

from __future__ import annotations

import contextlib

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent_prune.commands.common import (
    add_data_args,
    add_model_args,
    add_output_args,
    print_json,
    stderr_console,
)
from agent_prune.errors import InputError

# (column title, metric) in table order; higher = more important for every metric.
COLUMNS = (
    ("BI", "block_influence"),
    ("angular", "angular_distance"),
    ("wanda", "wanda"),
    ("wanda p10", "wanda_p10"),
    ("|grad|", "gradient"),
    ("taylor", "taylor"),
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="per-layer sensitivity profile (Wanda, gradients, block influence, z-scores)",
        description="Measure every decoder layer on C4 calibration windows and write a JSON profile.",
    )
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="windows run together (default 2; peak memory grows with it)")
    parser.add_argument("--no-gradients", action="store_true", help="skip gradient and Taylor metrics")
    parser.add_argument("--hessians", action="store_true",
                        help="add structured OBS scores (input Gram matrices of o_proj/down_proj)")
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="float32",
                        help="what the layers' passes multiply in (torch autocast; weights and statistics "
                             "stay --dtype), as 'agent-prune run --compute-dtype'. auto: bfloat16 for "
                             "float32 weights where the CPU (AVX512-BF16, AMX) or GPU has bfloat16 units. "
                             "Default float32")
    parser.add_argument("--out", default=None, help="write the profile JSON here (atomic)")
    add_output_args(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from agent_prune.data.corpora import c4_documents, calibration_windows
    from agent_prune.data.sources import resolve_data_dir
    from agent_prune.models.loading import load_model, resolve_device
    from agent_prune.models.precision import compute_dtype, resolve_compute_dtype
    from agent_prune.sensitivity import profile_model

    _check_args(args)
    resolve_device(args.device)  # fail before loading; weights stay on the CPU, layers run on it
    data_dir = resolve_data_dir(args.data_dir)
    with _status(args, "loading model"):
        loaded = load_model(args.model, "cpu", args.dtype)
    with _status(args, "sampling calibration windows"):
        windows = calibration_windows(loaded.tokenizer, c4_documents(data_dir),
                                      args.calib_samples, args.seqlen, args.seed)
    dtype = resolve_compute_dtype(args.compute_dtype, args.device, args.dtype)
    with _progress(args) as report, compute_dtype(dtype):
        profile = profile_model(
            loaded.model, windows, device=args.device, gradients=not args.no_gradients,
            hessians=args.hessians,
            batch_size=args.batch_size, progress=report, dataset="c4", seed=args.seed,
            model_name=loaded.source.display,
        )
    if args.out:
        profile.save(args.out)
    stderr_console.print(profile_table(profile))
    if args.out:
        stderr_console.print(f"wrote {args.out} ({profile.cost.seconds:.1f} s)")
    if args.json:
        print_json(profile.model_dump(mode="json"))
    return 0


def _check_args(args) -> None:
    for flag, value, least in (("--calib-samples", args.calib_samples, 1), ("--seqlen", args.seqlen, 2),
                               ("--batch-size", args.batch_size, 1)):
        if value < least:
            raise InputError(f"{flag} {value} is too small", f"use {flag} {least} or more")
    if args.out is None and not args.json:
        raise InputError("nothing to output", "pass --out profile.json and/or --json")


def profile_table(profile) -> Table:
    """One row per layer: source index, size, each metric with its z-score coloured."""
    table = Table(title=f"sensitivity profile: {profile.model.name or profile.model.model_type} "
                        f"({profile.calibration.samples} x {profile.calibration.seqlen} tokens)")
    for title in ("layer", "src", "params", *(c[0] for c in COLUMNS)):
        table.add_column(title, justify="right", no_wrap=True)
    table.add_column("protected")
    protected = {}
    for item in profile.protected:
        label = item.kind if item.kind == "layer" else f"{item.kind}:{item.index}"
        protected.setdefault(item.layer, []).append(label)
    for layer in profile.layers:
        cells = [_cell(getattr(layer, metric), layer.z.get(metric)) for _, metric in COLUMNS]
        table.add_row(str(layer.index), str(layer.source), f"{layer.params / 1e6:.2f}M", *cells,
                      ", ".join(protected.get(layer.index, [])))
    return table


def _cell(value: float | None, z: float | None) -> str:
    if value is None:
        return "-"
    colour = "red" if z <= -1 else "yellow" if z < -0.5 else "green" if z >= 1 else "default"
    return f"{value:.3g} [{colour}]({z:+.2f})[/{colour}]"


@contextlib.contextmanager
def _status(args, message: str):
    if args.quiet:
        yield
        return
    with stderr_console.status(message):
        yield


@contextlib.contextmanager
def _progress(args):
    if args.quiet:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=stderr_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{phase} (layers)", total=total)
            bar.update(tasks[phase], completed=done)

        yield report
