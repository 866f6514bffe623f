"""Token counts of the planner prompts, measured with a chat model's own tokenizer and chat template.

    python bench/planner_prompts.py \
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out bench/results/planner_prompts.json

Contexts: ``agent_prune.agent.planners.examples.example_context`` (the shared model's shape, all
six metrics, two accepted steps, one reflection) at 12, 30 and 60 layers; the propose prompt, the
reflect prompt, and the propose prompt after two repair turns (the longest a conversation gets).
Counts include the chat template's special tokens and the generation prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_prune.agent.planners.base import FailedStep
from agent_prune.agent.planners.examples import example_context
from agent_prune.agent.planners.heuristic import heuristic_proposal
from agent_prune.agent.planners.prompting import propose_messages, reflect_messages, repair_message
from agent_prune.io import atomic_write_json


def measure(tokenizer, num_layers: int) -> dict:
    context = example_context(num_layers=num_layers)
    propose = propose_messages(context)
    reply = heuristic_proposal(context).model_dump_json()
    repaired = propose + 2 * [{"role": "assistant", "content": reply},
                              repair_message(["depth.layers [40] do not exist (valid: 0..29)"])]
    failed = FailedStep(iteration=3, proposal=heuristic_proposal(context),
                        outcome="depth: perplexity +41% (gate 50%)",
                        candidates=[{"branch": "depth", "metrics": {"perplexity": 41.2}},
                                    {"branch": "width", "metrics": {"perplexity": 38.0}}])
    reflect = reflect_messages(context, failed)

    def count(messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        return len(ids)

    return {"layers": num_layers, "propose": count(propose), "reflect": count(reflect),
            "propose_after_2_repairs": count(repaired), "system": count(propose[:1]),
            "propose_chars": sum(len(m["content"]) for m in propose)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF folder or .gguf (its tokenizer is used)")
    parser.add_argument("--layers", default="12,30,60")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from agent_prune.models.loading import load_model

    tokenizer = load_model(args.model).tokenizer
    rows = [measure(tokenizer, int(n)) for n in args.layers.split(",")]
    print(f"{'layers':>6} {'system':>7} {'propose':>8} {'+2 repairs':>11} {'reflect':>8}")
    for r in rows:
        print(f"{r['layers']:>6} {r['system']:>7} {r['propose']:>8} {r['propose_after_2_repairs']:>11} "
              f"{r['reflect']:>8}")
    if args.out:
        atomic_write_json(Path(args.out), {"model": args.model, "tokens": rows,
                                           "context_window": tokenizer.model_max_length})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
