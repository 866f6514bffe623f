"""Helpers the recovery benches share: the simple perplexity protocol, a Wanda-structured MLP cut, RSS.

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
from agent_prune.recovery.streaming import batches


def perplexity(model: nn.Module, tokenizer, data_dir, seqlen: int = 512, windows: int = 32) -> float:
    ids = split_windows(tokenize_text(tokenizer, wikitext2_text(data_dir, "test")), seqlen, windows)
    return evaluate_perplexity(model, ids)[0].value


@torch.no_grad()
def wanda_mlp_scores(adapter, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Wanda-sp MLP channel scores (An et al., arXiv 2312.11983): the sum of |W| * ||X|| over every
    weight of the channel: its gate and up rows (inputs: the MLP's input features) and its down column
    (input: the channel's own activation)."""
    mlps = [adapter.mlp_projections(layer) for layer in adapter.layers()]
    norms_in = [torch.zeros(m["gate_proj"].in_features) for m in mlps]
    norms_mid = [torch.zeros(m["down_proj"].in_features) for m in mlps]

    def accumulate(acc):
        def hook(_module, args, _output):
            acc.add_(args[0].float().pow(2).sum(dim=(0, 1)))  # returns None: output unchanged
        return hook

    hooks = [m["gate_proj"].register_forward_hook(accumulate(a)) for m, a in zip(mlps, norms_in)]
    hooks += [m["down_proj"].register_forward_hook(accumulate(a)) for m, a in zip(mlps, norms_mid)]
    try:
        for part in batches(windows.shape[0], batch_size):
            adapter.model(input_ids=windows[part], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    scores = []
    for m, x_in, x_mid in zip(mlps, norms_in, norms_mid):
        rows = (m["gate_proj"].weight.abs() + m["up_proj"].weight.abs()) @ x_in.sqrt()
        scores.append(rows + m["down_proj"].weight.abs().sum(dim=0) * x_mid.sqrt())
    return scores


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
