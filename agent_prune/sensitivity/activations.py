"""Layer inputs kept between the profile's forward and backward passes, and across profiles.

The profile streams the model one layer at a time (:mod:`agent_prune.models.streaming`); the
gradient pass walks back down and needs every layer's inputs again, so they are stored here.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from agent_prune.errors import InputError


def windows_digest(windows: torch.Tensor) -> str:
    """Identity of a calibration set: the token ids' bytes (reused activations must match it)."""
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


class ActivationStore:
    """Layer inputs for the whole calibration set, by current layer index, for the backward pass.

    ``disk`` (default) writes each tensor to a temporary file and reads it back when needed, so
    host memory holds one layer's activations at a time; ``memory`` keeps them as tensors (fast,
    but ``layers x samples x seqlen x hidden`` elements stay resident). Each entry carries a key
    (the calibration set and the fingerprints of the layers below it, see
    :func:`~agent_prune.sensitivity.fingerprints.prefix_keys`), so a later profile reuses an entry
    only when it is still exactly what those layers would produce.
    """

    def __init__(self, kind: str = "disk", directory: str | Path | None = None):
        if kind not in ("disk", "memory"):
            raise InputError(f"unknown activation store '{kind}'", "use 'disk' or 'memory'")
        self.kind = kind
        self._tensors: dict[int, torch.Tensor] = {}
        self._meta: dict[int, tuple[torch.Size, torch.dtype, str | None]] = {}
        self._dir = None
        if kind == "disk":
            self._dir = Path(tempfile.mkdtemp(prefix="agent-prune-acts-", dir=directory))

    def put(self, index: int, tensor: torch.Tensor, key: str | None = None) -> None:
        tensor = tensor.detach()
        if self._dir is None:
            self._tensors[index] = tensor.clone()
        else:
            raw = tensor.to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
            raw.tofile(self._dir / f"layer{index}.bin")
        self._meta[index] = (tensor.shape, tensor.dtype, key)

    def has(self, index: int, key: str | None = None) -> bool:
        return index in self._meta and (key is None or self._meta[index][2] == key)

    def get(self, index: int, device: torch.device, samples: slice | None = None) -> torch.Tensor:
        """Layer ``index``'s inputs (only the ``samples`` rows if given: the disk store reads just those)."""
        rows = samples or slice(None)
        if self._dir is None:  # a copy: callers may use it as a working buffer
            return self._tensors[index][rows].to(device, copy=True)
        shape, dtype, _ = self._meta[index]
        first, stop, _ = rows.indices(shape[0])
        row_bytes = shape[1:].numel() * dtype.itemsize
        raw = np.fromfile(self._dir / f"layer{index}.bin", dtype=np.uint8,
                          count=(stop - first) * row_bytes, offset=first * row_bytes)
        return torch.from_numpy(raw).view(dtype).reshape(stop - first, *shape[1:]).to(device)

    def drop_from(self, index: int) -> None:
        """Forget layers ``index`` and above (they change when an earlier layer changes)."""
        for i in [i for i in self._meta if i >= index]:
            self._meta.pop(i)
            self._tensors.pop(i, None)
            if self._dir is not None:
                (self._dir / f"layer{i}.bin").unlink(missing_ok=True)

    def close(self) -> None:
        self.drop_from(0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
