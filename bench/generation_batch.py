"""Does the report's FreebaseQA exact match depend on the generation batch size? Greedy answers to the
same questions at two batch sizes, compared text by text, with the seconds each took.

    python bench/generation_batch.py ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        runs/demo/model --data-dir ../shared/data --json-out bench/results/generation_batch.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's agent_prune

from agent_prune.data.tasks import freebaseqa_items
from agent_prune.evaluation import knowledge
from agent_prune.io import atomic_write_json
from agent_prune.models.loading import load_model


def compare_batches(model_path: str, data_dir: Path, questions: int, sizes: tuple[int, int]) -> dict:
    loaded = load_model(model_path)
    items = freebaseqa_items(data_dir)[:questions]
    runs = {}
    for size in sizes:
        started = time.perf_counter()
        hits, texts = knowledge.exact_match(loaded.model, loaded.tokenizer, items, batch_size=size)
        runs[size] = {"seconds": round(time.perf_counter() - started, 1), "hits": int(hits.sum()),
                      "texts": texts}
    first, second = (runs[size]["texts"] for size in sizes)
    return {"model": model_path, "questions": len(items),
            "identical_texts": sum(a == b for a, b in zip(first, second)),
            "differing": [{"question": i, "texts": [a, b]} for i, (a, b) in enumerate(zip(first, second))
                          if a != b][:10],
            **{f"batch_{size}": {k: v for k, v in runs[size].items() if k != "texts"} for size in sizes}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders or .gguf files")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=300, help="first N FreebaseQA dev questions")
    parser.add_argument("--sizes", default="16,64", help="the two batch sizes to compare")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if len(sizes) != 2:
        parser.error("--sizes takes two batch sizes, e.g. 16,64")
    rows = []
    for model in args.models:
        rows.append(compare_batches(model, args.data_dir, args.questions, sizes))
        print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        atomic_write_json(args.json_out, {"command": sys.argv, "rows": rows})


if __name__ == "__main__":
    main()
