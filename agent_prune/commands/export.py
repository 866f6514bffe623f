"""``agent-prune export RUN_DIR``: export any accepted step of a run as a HF folder or a GGUF file."""

from __future__ import annotations

import argparse

from agent_prune.commands.common import print_json, stderr_console
from agent_prune.errors import InputError
from agent_prune.models.formats import add_format_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export an accepted step of a run as a model folder",
        description="Replay a run's accepted step (default: its best) onto the base model and write "
                    "a Hugging Face folder (safetensors, config, tokenizer, manifest) or, with "
                    "--format gguf, one GGUF file for llama.cpp.",
        epilog="examples:\n  agent-prune export runs/r1 --out pruned-best\n"
               "  agent-prune export runs/r1 --step 2 --out pruned-step2 --json\n"
               "  agent-prune export runs/r1 --format gguf --quant Q8_0 --out pruned.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, help="accepted step to export (default: the best)")
    parser.add_argument("--out", required=True,
                        help="output folder (must be new or empty), or FILE.gguf with --format gguf")
    add_format_args(parser)
    parser.add_argument("--json", action="store_true", help="print the export summary as JSON")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from agent_prune.agent.resources import RunResources
    from agent_prune.agent.session import read_run_options
    from agent_prune.agent.states import ModelStates
    from agent_prune.models.formats import check_format, input_gguf, write_model

    fmt = args.export_format or "hf"
    check_format(fmt, args.export_quant)
    states = ModelStates(RunResources(read_run_options(args.run_dir)))
    index = states.store.index()
    step = index.best if args.step is None else args.step
    if step is None or step not in index.steps:
        raise InputError(f"step {args.step} is not an accepted step of this run",
                         f"accepted steps: {index.steps}")
    model, manifest = states.load(states.store.step_dir(step))
    summary = write_model(model, states.resources.base.tokenizer, args.out, manifest, fmt, args.export_quant,
                          reference=input_gguf(states.resources.options.model))
    payload = {"run_dir": args.run_dir, "step": step, "sparsity": index.sparsity.get(step), **summary}
    if args.json:
        print_json(payload)
    else:
        stderr_console.print(f"exported step {step} (sparsity {payload['sparsity']:.1%}) to {args.out} "
                             f"({summary['bytes']:,} bytes, {fmt})")
    return 0
