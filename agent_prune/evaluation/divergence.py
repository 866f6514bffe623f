"""KL divergence of a model's next-token distributions from a reference model's, per token window.

Used as the fast in-loop signal "how far has pruning moved the model from the dense one": the
forward KL ``KL(p_ref || p_model)`` averaged over every position of a window (the quantity that
distillation-based recovery minimises). The reference log-probabilities are computed once and stored
in float16 (renormalised in float32 when used), so the reference model need not stay in memory; with
``spill_dir`` they go to a file there and one window at a time is read back (:class:`SpilledLogProbs`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agent_prune.evaluation.progress import Advance
from agent_prune.evaluation.scoring import LOGIT_POSITIONS, model_device
from agent_prune.models.streaming import batch_slices


class SpilledLogProbs:
    """``[N, L, V]`` float16 log-probabilities in an unnamed file under ``directory``, read back one
    window at a time: the loop's 4 KL windows of 512 x 49k are 200 MB that would otherwise stay
    resident for the whole run (issue 16). The file is deleted when this object is closed or
    collected, or when the process ends."""

    def __init__(self, directory: Path):
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (lives as long as the object)
        self.shape: tuple[int, ...] = (0,)

    def append(self, row: torch.Tensor) -> None:
        if self.shape[1:] not in ((), tuple(row.shape)):
            raise ValueError(f"row {tuple(row.shape)} does not match {self.shape[1:]}")
        self._file.write(row.to(torch.float16).contiguous().numpy().tobytes())
        self.shape = (self.shape[0] + 1, *row.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | tuple[int, slice]) -> torch.Tensor:
        """Window ``index`` (``[L, V]``), or ``[index, positions]`` with a contiguous slice of positions:
        only those are read, as indexing a tensor would give them."""
        index, positions = key if isinstance(key, tuple) else (key, slice(None))
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"window {index} of {self.shape[0]}")
        start, stop, step = positions.indices(self.shape[1])
        if step != 1:
            raise ValueError("positions must be a contiguous slice")
        row = int(np.prod(self.shape[2:]))  # values per position
        count = max(0, stop - start) * row
        data = os.pread(self._file.fileno(), 2 * count, 2 * row * (index * self.shape[1] + start))
        return torch.from_numpy(np.frombuffer(data, dtype=np.float16).copy()).view(-1, *self.shape[2:])

    def close(self) -> None:
        self._file.close()


@torch.inference_mode()
def reference_log_probs(
    model, windows: torch.Tensor, *, batch_size: int = 4, advance: Advance | None = None,
    spill_dir: Path | None = None,
) -> torch.Tensor | SpilledLogProbs:
    """The reference model's next-token log-probabilities on ``[N, L]`` windows: ``[N, L, V]`` float16,
    in memory, or in a file under ``spill_dir`` (the same values, read back per window)."""
    device = model_device(model)
    spilled = SpilledLogProbs(spill_dir) if spill_dir is not None else None
    rows = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for i in range(batch.shape[0]):
            row = F.log_softmax(logits[i].float(), dim=-1).half().cpu()
            if spilled is not None:
                spilled.append(row)
            else:
                rows.append(row)
        del logits
        if advance is not None:
            advance(batch.shape[0])
    return spilled if spilled is not None else torch.stack(rows)


@torch.inference_mode()
def window_kl(
    model, windows: torch.Tensor, reference: torch.Tensor | SpilledLogProbs, *, batch_size: int = 4,
    advance: Advance | None = None,
) -> torch.Tensor:
    """Mean over positions of ``KL(p_ref || p_model)`` (nats) for each window, float64 of length N."""
    if tuple(reference.shape[:2]) != tuple(windows.shape):
        raise ValueError(f"reference log-probs {tuple(reference.shape)} do not match windows "
                         f"{tuple(windows.shape)}")
    device = model_device(model)
    values = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(batch.shape[0]):
            # A chunk of the reference at a time: a spilled one is read back 12 MB at a time, not 50.
            chunks = batch_slices(windows.shape[1], LOGIT_POSITIONS)
            per_position = [position_kl(reference[start + row, c].to(device), logits[row, c]) for c in chunks]
            values.append(torch.cat(per_position).mean().double().cpu())
        del logits
        if advance is not None:
            advance(batch.shape[0])
    return torch.stack(values)


def position_kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_model)`` at each position of ``[positions, vocab]`` reference log-probs and model
    logits: exp(ref) * (ref - model), with two temporaries of that shape instead of five."""
    gap = F.log_softmax(reference.float(), dim=-1)
    ref_p = gap.exp()
    gap.sub_(F.log_softmax(logits.float(), dim=-1))
    return gap.mul_(ref_p).sum(-1)
