"""Helpers the recovery benches share: the simple perplexity protocol, a Wanda-structured MLP cut, RSS.

Perplexity (Wanda/SparseGPT protocol): WikiText-2 raw test joined with blank lines, tokenised once,
non-overlapping ``seqlen`` windows from the start, mean token NLL per window, exp of the mean.
"""

from __future__ import annotations

import os
import threading
import time

import torch
from torch import nn

from agent_prune.data.corpora import split_windows, tokenize_text, wikitext2_text
from agent_prune.recovery.streaming import batches


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, data_dir, seqlen: int = 512, windows: int = 32,
               batch_size: int = 4) -> float:
    ids = split_windows(tokenize_text(tokenizer, wikitext2_text(data_dir, "test")), seqlen, windows)
    nll = []
    for part in batches(ids.shape[0], batch_size):
        logits = model(input_ids=ids[part], use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), ids[part][:, 1:], reduction="none")
        nll += loss.mean(dim=1).tolist()
    return float(torch.tensor(nll).mean().exp())


@torch.no_grad()
def wanda_mlp_scores(adapter, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, per MLP channel: ||X_j||_2 * sum_i |W_down[i, j]| (Wanda's |W|*||X||, by column)."""
    downs = [adapter.mlp_projections(layer)["down_proj"] for layer in adapter.layers()]
    sq = [torch.zeros(down.in_features) for down in downs]

    def accumulate(acc):
        def hook(_module, args, _output):
            acc.add_(args[0].float().pow(2).sum(dim=(0, 1)))  # returns None: output unchanged
        return hook

    hooks = [down.register_forward_hook(accumulate(acc)) for down, acc in zip(downs, sq)]
    try:
        for part in batches(windows.shape[0], batch_size):
            adapter.model(input_ids=windows[part], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [acc.sqrt() * down.weight.abs().sum(dim=0) for down, acc in zip(downs, sq)]


def _slice(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    return new


def cut_mlp_channels(adapter, scores: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Keep the ``keep`` highest-scoring MLP channels in every layer (in place); returns kept indices."""
    kept = []
    for layer, score in zip(adapter.layers(), scores):
        index = score.topk(keep).indices.sort().values
        mlp = adapter.mlp(layer)
        mlp.gate_proj = _slice(mlp.gate_proj, index, 0)
        mlp.up_proj = _slice(mlp.up_proj, index, 0)
        mlp.down_proj = _slice(mlp.down_proj, index, 1)
        kept.append(index)
    return kept


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
