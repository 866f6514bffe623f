"""``agent-prune apply``: apply a JSON list of pruning actions to a model and export the result.

    agent-prune apply --model M --actions actions.json --out DIR [--format gguf [--quant Q8_0]] [--json]

``actions.json`` holds e.g. ``[{"kind": "remove_layers", "layers": [12, 13]},
{"kind": "prune_width", "layer": 3, "mlp_channels": 0.25}]`` (schema: ``agent_prune.actions.schema``).
What to cut inside a layer is chosen by weight magnitude (no calibration data is read here). A model
that is itself an agent-prune export continues from its manifest.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from agent_prune.commands.common import add_model_args, add_output_args, print_json, stderr_console
from agent_prune.errors import AgentPruneError, InputError
from agent_prune.models.formats import add_format_args

EXAMPLE_HINT = 'write a JSON list such as [{"kind": "remove_layers", "layers": [12]}]'


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("apply", help="apply pruning actions (JSON) to a model and export it",
                                   description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--actions", required=True,
                        help="JSON file with a list of actions (or the JSON text itself)")
    parser.add_argument("--out", required=True,
                        help="folder to write the exported model to (FILE.gguf with --format gguf)")
    add_format_args(parser)
    add_output_args(parser)
    parser.set_defaults(handler=run)


def read_actions(spec: str):
    from agent_prune.actions import parse_actions

    path = Path(spec).expanduser()
    if path.is_file():
        return parse_actions_file(path)
    if spec.lstrip().startswith(("[", "{")):
        return parse_actions(spec)
    raise InputError(f"actions file {spec} does not exist", "pass a JSON file with a list of actions")


def parse_actions_file(path: Path):
    """Actions from a file; every problem names the file, since the text itself is not on screen."""
    from agent_prune.actions import parse_actions

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"actions file {path} is not UTF-8 text", EXAMPLE_HINT) from None
    if not text.strip():
        raise InputError(f"actions file {path} is empty", EXAMPLE_HINT)
    try:
        return parse_actions(text)
    except AgentPruneError as exc:
        raise InputError(f"actions file {path}: {exc.message}", exc.hint) from None


def _sizes(model, base_prunable: int) -> dict:
    """Parameter counts (one definition: ``count_parameters``) and bytes of weights in memory."""
    from agent_prune.models.accounting import count_parameters, weight_bytes

    return count_parameters(model, base_prunable).summary() | {"weight_bytes": weight_bytes(model)}


def run(args) -> int:
    from agent_prune.actions import apply_actions, dense_manifest
    from agent_prune.models.export import read_manifest
    from agent_prune.models.formats import check_format, input_gguf, write_model
    from agent_prune.models.loading import load_model

    fmt = args.export_format or "hf"
    check_format(fmt, args.export_quant)
    actions = read_actions(args.actions)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    start = (read_manifest(loaded.source.path) if loaded.source.kind == "export"
             else dense_manifest(loaded.model, fingerprint=loaded.source.fingerprint()))
    base_prunable = start.base.prunable_parameters
    before = _sizes(loaded.model, base_prunable)
    manifest = apply_actions(loaded.model, actions, start)
    after = _sizes(loaded.model, base_prunable)
    export = write_model(loaded.model, loaded.tokenizer, args.out, manifest, fmt, args.export_quant,
                         reference=input_gguf(args.model))
    structural = len(manifest.layers) != len(start.layers) or manifest.widths() != start.widths()
    masked = any(a.action.kind == "mask_sparsity" for a in manifest.actions[len(start.actions):])
    note = "structural: tensors are physically smaller" if structural else "no size or speed change"
    if structural and masked:
        note += "; the masks add no size or speed change"
    applied = manifest.actions[len(start.actions):]
    payload = {"out": export["path"], "export": export, "before": before, "after": after,
               "actions": [a.model_dump(mode="json") for a in applied], "note": note}
    if args.json:
        print_json(payload)
    else:
        _print_report(payload)
    return 0


def _print_report(payload: dict) -> None:
    table = Table(title="agent-prune apply", show_header=True)
    for column in ("", "before", "after"):
        table.add_column(column, justify="right" if column else "left")
    before, after = payload["before"], payload["after"]
    for key in ("total", "prunable", "structural_sparsity", "mask_sparsity", "weight_bytes"):
        table.add_row(key, f"{before[key]:,}", f"{after[key]:,}")
    stderr_console.print(table)
    for record in payload["actions"]:
        stderr_console.print(f"- {record['action']['kind']}: {record['effect']}")
    stderr_console.print(f"{payload['note']}; exported to {payload['out']} "
                         f"({payload['export']['bytes']:,} bytes, {payload['export']['format']}; loads with "
                         f"{payload['export']['loads_with']})")
