"""``agent-prune heal``: distil any pruned model toward its dense teacher on C4 and save the result.

Works on agent-prune exports and on plain Hugging Face folders made by other tools. Shows progress
with an ETA, and a before/after table (WikiText-2 test perplexity, held-out C4 KL to the teacher).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from agent_prune.commands.common import (
    add_data_args,
    add_model_args,
    add_output_args,
    comma_list,
    print_json,
    stderr_console,
)
from agent_prune.data.corpora import split_windows, tokenize_text, wikitext2_text
from agent_prune.data.sources import resolve_data_dir
from agent_prune.errors import InputError
from agent_prune.evaluation.perplexity import perplexity
from agent_prune.models.export import export_model, read_manifest
from agent_prune.models.formats import add_format_args, check_format, input_gguf, write_model
from agent_prune.models.loading import load_model, save_dense
from agent_prune.recovery.calibration import recovery_windows
from agent_prune.recovery.heal import ALL_PROJECTIONS, HealProgress, HealSettings, heal


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("heal", help="distil a pruned model toward its dense teacher",
                                   description=__doc__)
    add_model_args(parser)
    parser.add_argument("--teacher", required=True, help="the dense model the student was pruned from")
    parser.add_argument("--out", required=True,
                        help="folder for the healed model (must not exist); FILE.gguf with --format gguf")
    add_format_args(parser)
    parser.add_argument("--tokens", type=int, required=True, help="training token budget")
    parser.add_argument("--seconds", type=float, default=None, help="wall-clock budget for training")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--modules", default=",".join(ALL_PROJECTIONS),
                        help="projections to train, comma-separated (default: all seven)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=32,
                        help="WikiText-2 test windows for the before/after perplexity (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    add_data_args(parser)
    add_output_args(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    out = Path(args.out)
    if out.exists():
        raise InputError(f"output folder {out} already exists", "pass a new --out folder")
    fmt = args.export_format or "hf"
    check_format(fmt, args.export_quant)
    if args.tokens <= 0:
        raise InputError(f"--tokens must be positive, got {args.tokens}", "e.g. --tokens 200000")
    settings = HealSettings(max_tokens=args.tokens, max_seconds=args.seconds, method=args.method,
                            modules=comma_list(args.modules),
                            lora_rank=args.rank, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    data_dir = resolve_data_dir(args.data_dir)
    student = load_model(args.model, args.device, args.dtype)
    teacher = load_model(args.teacher, args.device, args.dtype)
    _check_pair(student, teacher)
    train, heldout = recovery_windows(student.tokenizer, data_dir, tokens=args.tokens, seqlen=args.seqlen,
                                      seed=args.seed)
    ppl_ids = _ppl_windows(student.tokenizer, data_dir, args.seqlen, args.ppl_windows)
    ppl_before, teacher_ppl = _perplexity(student.model, ppl_ids), _perplexity(teacher.model, ppl_ids)
    manifest = read_manifest(student.source.path) if student.source.kind == "export" else None
    report = _heal_with_progress(student.model, teacher.model, train, heldout, settings, manifest, args.quiet)
    before = {"perplexity": ppl_before, "kl": report.kl_before}
    after = {"perplexity": _perplexity(student.model, ppl_ids), "kl": report.kl_after}
    if fmt == "gguf":
        _save_gguf(student, teacher, manifest, out, report, args.export_quant)
    else:
        _save(student, manifest, out, report)
    result = {"out": str(out), "before": before, "after": after, "teacher_perplexity": teacher_ppl,
              "tokens": report.tokens, "seconds": round(report.seconds, 1), "stopped_by": report.stopped_by,
              "settings": settings.model_dump(),
              "protocol": _protocol(args, heldout)}
    if args.json:
        print_json(result)
    else:
        _print_table(result)
    return 0


def _protocol(args, heldout: torch.Tensor) -> dict:
    return {"perplexity": f"WikiText-2 test, seqlen {args.seqlen}, first {args.ppl_windows} windows",
            "kl": f"KL(teacher||student), {heldout.shape[0]} held-out C4 windows, nats/token",
            "training": "C4 en train windows (calibration text only)"}


def _check_pair(student, teacher) -> None:
    s_vocab = student.model.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.model.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise InputError(f"student vocabulary ({s_vocab}) differs from the teacher's ({t_vocab})",
                         "pass the dense model the student was pruned from as --teacher")


def _ppl_windows(tokenizer, data_dir, seqlen: int, count: int) -> torch.Tensor | None:
    if count <= 0:
        return None
    return split_windows(tokenize_text(tokenizer, wikitext2_text(data_dir, "test")), seqlen, count)


def _perplexity(model: nn.Module, ids: torch.Tensor | None) -> float | None:
    return None if ids is None else perplexity(model, ids)[0].value


def _heal_with_progress(student, teacher, train, heldout, settings: HealSettings, manifest, quiet: bool):
    columns = (TextColumn("healing"), BarColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console, disable=quiet) as bar:
        task = bar.add_task("heal", total=1.0, status="")

        def update(p: HealProgress) -> None:
            bar.update(task, completed=p.fraction, status=f"{p.tokens:,} tok  KL {p.kl:.3f}")

        return heal(student, teacher, train, settings, eval_windows=heldout, manifest=manifest,
                    progress=update)


def _save(loaded, manifest, out: Path, report) -> None:
    """Write the healed model and the report to a temporary folder, then move it into place.

    An agent-prune export stays one (its manifest, now marking the healed modules overridden, and
    per-layer widths); any other model is saved as a plain Hugging Face folder.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".heal-", dir=out.parent))
    try:
        staged = tmp / "model"
        if manifest is not None:
            export_model(loaded.model, loaded.tokenizer, staged, manifest)
        else:
            save_dense(loaded.model, loaded.tokenizer, staged)
        (staged / "heal_report.json").write_text(json.dumps(report.model_dump(), indent=2))
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_gguf(student, teacher, manifest, out: Path, report, quant: str | None) -> None:
    """One GGUF file, with the healing report beside it (``NAME.gguf.heal_report.json``).

    The tokenizer and tensor types come from whichever of student and teacher was loaded from a
    GGUF (a healed export usually descends from the teacher's GGUF).
    """
    from agent_prune.actions import dense_manifest

    reference = input_gguf(student.source.spec) or input_gguf(teacher.source.spec)
    write_model(student.model, student.tokenizer, out, manifest or dense_manifest(student.model), "gguf",
                quant, reference=reference)
    out.with_name(out.name + ".heal_report.json").write_text(json.dumps(report.model_dump(), indent=2))


def _print_table(result: dict) -> None:
    table = Table(title=f"healed in {result['seconds']} s on {result['tokens']:,} tokens "
                        f"(stopped by {result['stopped_by']})")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("teacher", justify="right")
    table.add_row("WikiText-2 perplexity", _fmt(result["before"]["perplexity"]),
                  _fmt(result["after"]["perplexity"]), _fmt(result["teacher_perplexity"]))
    table.add_row("KL to teacher (held-out C4)", _fmt(result["before"]["kl"], 4),
                  _fmt(result["after"]["kl"], 4), "0")
    stderr_console.print(table)
    stderr_console.print(f"saved to {result['out']}")


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

