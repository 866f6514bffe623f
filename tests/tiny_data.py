"""A byte-level tokenizer (256 ids, fits the tiny models' vocab) and a tiny local data directory, so the
evaluation code runs end to end on tiny random models in unit tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("river", "stone", "light", "garden", "city", "music", "paper", "window", "silver", "forest",
         "engine", "history", "planet", "question", "answer", "island", "winter", "summer", "bridge",
         "market", "letter", "doctor", "castle", "ocean")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer():
    """A fast tokenizer whose ids are the UTF-8 bytes of the text; byte 0 is EOS and padding."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    core = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    core.pre_tokenizer = ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=table[0], pad_token=table[0])


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."


def write_data_dir(root: Path, questions: int = 40, seed: int = 0) -> Path:
    """The shared data layout (WikiText-2, C4, FreebaseQA, ARC-Easy) filled with short synthetic rows."""
    rng = random.Random(seed)

    def write(relative: str, rows: list[dict]) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    for split in ("test", "validation"):
        write(f"wikitext-2-raw/wikitext-2-raw-v1.{split}.jsonl",
              [{"text": " ".join(_sentence(rng) for _ in range(3))} for _ in range(30)])
    write("c4/c4_en_train_first1000.jsonl",
          [{"text": " ".join(_sentence(rng) for _ in range(6))} for _ in range(120)])
    qa = []
    for i in range(questions):
        answer = str(rng.randint(1900, 2000)) if i % 5 == 0 else " ".join(rng.sample(WORDS, 1 + i % 3))
        qa.append({"id": f"q{i}", "question": f"Which {rng.choice(WORDS)} is near the {rng.choice(WORDS)}?",
                   "answers": [answer]})
    write("freebaseqa/freebaseqa_dev.jsonl", qa)
    write("mc/arc_easy_validation.jsonl", [
        {"id": f"a{i}", "question": f"What is a {rng.choice(WORDS)}?", "choices": rng.sample(WORDS, 4),
         "labels": ["A", "B", "C", "D"], "answerKey": "ABCD"[i % 4]} for i in range(12)])
    return root
