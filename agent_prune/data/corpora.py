"""Text corpora as token windows: WikiText-2 for perplexity, C4 for calibration and healing."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from agent_prune.data.sources import hub_dataset, local_file, read_jsonl
from agent_prune.errors import InputError

WIKITEXT_FILES = {
    "test": "wikitext-2-raw/wikitext-2-raw-v1.test.jsonl",
    "validation": "wikitext-2-raw/wikitext-2-raw-v1.validation.jsonl",
}
C4_FILE = "c4/c4_en_train_first1000.jsonl"


def wikitext2_text(data_dir: Path | None, split: str = "test") -> str:
    """WikiText-2 raw joined with blank lines, as in the Wanda/SparseGPT perplexity protocol."""
    if split not in WIKITEXT_FILES:
        raise InputError(f"unknown WikiText-2 split '{split}'", "use test or validation")
    if data_dir is None:
        rows = hub_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    else:
        rows = [r["text"] for r in read_jsonl(local_file(data_dir, WIKITEXT_FILES[split]))]
    return "\n\n".join(rows)


def c4_documents(data_dir: Path | None, limit: int = 1000) -> list[str]:
    """The first ``limit`` documents of C4 en train (shard 0), the calibration corpus."""
    if data_dir is None:
        ds = hub_dataset("allenai/c4", split="train",
                         data_files={"train": "en/c4-train.00000-of-01024.json.gz"})
        return [row["text"] for row in ds.select(range(min(limit, len(ds))))]
    docs = []
    for row in read_jsonl(local_file(data_dir, C4_FILE)):
        docs.append(row["text"])
        if len(docs) >= limit:
            break
    return docs


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D tensor (tokenised once, no truncation)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids[0]


def split_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows from the start of ``ids``; the remainder is dropped."""
    if seqlen < 2:
        raise InputError(f"seqlen {seqlen} is too small", "use --seqlen 2 or more (512 is standard)")
    count = ids.numel() // seqlen
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}",
                         "use a smaller --seqlen")
    return ids[: count * seqlen].view(count, seqlen)


def calibration_windows(
    tokenizer, documents: list[str], samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``samples`` random ``seqlen`` windows from documents longer than ``seqlen`` (Wanda/SparseGPT).

    Each sample draws a document at random (retrying short ones), then a random start inside it;
    ``random.Random(seed)`` makes the choice reproducible and independent of global state.
    """
    rng = random.Random(seed)
    tokenized: dict[int, torch.Tensor] = {}
    windows = []
    attempts = 0
    while len(windows) < samples:
        attempts += 1
        if attempts > 200 * samples:
            raise InputError(f"too few calibration documents longer than {seqlen} tokens",
                             "use a smaller --seqlen or a larger corpus")
        index = rng.randrange(len(documents))
        if index not in tokenized:
            tokenized[index] = tokenizer(documents[index], return_tensors="pt").input_ids[0]
        ids = tokenized[index]
        if ids.numel() <= seqlen:
            continue
        start = rng.randrange(ids.numel() - seqlen)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)
