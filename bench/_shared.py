"""Helpers the recovery benches share: the simple perplexity protocol, Wanda-structured MLP scores, RSS.

Perplexity: ``agent_prune.evaluation`` (Wanda/SparseGPT protocol: WikiText-2 raw test joined with
blank lines, tokenised once, the first non-overlapping ``seqlen`` windows, exp of the mean NLL).
"""

from __future__ import annotations

import os
import threading
import time

import torch
from torch import nn

from agent_prune.data.corpora import split_windows, tokenize_text, wikitext2_text
from agent_prune.evaluation.perplexity import perplexity as evaluate_perplexity
from agent_prune.models.streaming import batch_slices


def perplexity(model: nn.Module, tokenizer, data_dir, seqlen: int = 512, windows: int = 32) -> float:
    ids = split_windows(tokenize_text(tokenizer, wikitext2_text(data_dir, "test")), seqlen, windows)
    return evaluate_perplexity(model, ids)[0].value


@torch.no_grad()
def wanda_mlp_scores(adapter, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Wanda-structured MLP channel scores ``||X_j||_2 * sum_i |W_down[i, j]|`` (Sun et al., arXiv
    2306.11695, by column; the width baseline of issue 10/11 and ``bench/signals.py``)."""
    downs = [adapter.mlp_projections(layer)["down_proj"] for layer in adapter.layers()]
    sq = [torch.zeros(down.in_features) for down in downs]

    def accumulate(acc):
        def hook(_module, args, _output):
            acc.add_(args[0].float().pow(2).sum(dim=(0, 1)))  # returns None: output unchanged
        return hook

    hooks = [down.register_forward_hook(accumulate(acc)) for down, acc in zip(downs, sq)]
    try:
        for part in batch_slices(windows.shape[0], batch_size):
            adapter.model(input_ids=windows[part], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [acc.sqrt() * down.weight.abs().sum(dim=0) for down, acc in zip(downs, sq)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's resident set every 50 ms while the block runs."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False
