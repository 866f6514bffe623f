"""Calibration text for recovery: C4 windows to train on, and held-out C4 windows to measure KL on.

The last ``HELDOUT_DOCUMENTS`` C4 documents are kept apart, so the KL reported before and after
healing is measured on text the student never trained on. No evaluation split is ever used here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from agent_prune.data.corpora import c4_documents, calibration_windows

HELDOUT_DOCUMENTS = 50


def recovery_windows(tokenizer, data_dir: Path | None, *, tokens: int, seqlen: int, heldout: int = 8,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows covering about ``tokens`` tokens, ``heldout`` windows from other documents)."""
    documents = c4_documents(data_dir)
    train_docs, heldout_docs = documents[:-HELDOUT_DOCUMENTS], documents[-HELDOUT_DOCUMENTS:]
    train = calibration_windows(tokenizer, train_docs, max(1, math.ceil(tokens / seqlen)), seqlen, seed)
    held = calibration_windows(tokenizer, heldout_docs, heldout, seqlen, seed)
    return train, held
