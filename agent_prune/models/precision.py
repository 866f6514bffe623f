"""The dtype a run's forward passes multiply in (``--compute-dtype``), apart from the weights' dtype.

The loop's calibration walks (profile, refit) and its candidate scoring are matrix products of
float32 weights; on a CPU with AVX512-BF16 (or AMX), or a GPU with bfloat16 units, torch's autocast
runs them in bfloat16 with float32 accumulation at about twice the speed, while the weights, the
residual stream and every statistic stay float32 (the logits come out bfloat16; their softmax is
taken in float32). The report's before/after
evaluation and speed are never inside: their figures keep the weights' own precision.

The run sets the dtype around its passes with :func:`compute_dtype`; the places that run a module's
forward (the layer-streaming engine, the scoring functions' callers) enter :func:`autocast_forward`;
statistics computed inside a forward (collector hooks) are wrapped in :func:`full_precision`, so
their products stay float32 whatever the forward multiplies in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")

_ACTIVE: ContextVar[torch.dtype | None] = ContextVar("compute_dtype", default=None)


def native_bfloat16(device: str) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (else autocast would emulate it, slower)."""
    if device.startswith("cuda"):
        # bfloat16 units, not the emulation torch also counts (slower than float32 on V100 or T4)
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_compute_dtype(setting: str, device: str, weights_dtype: str) -> str:
    """``auto`` made concrete: bfloat16 for float32 weights on a device with native bfloat16, else
    float32 (no autocast). Weights already in a 16-bit dtype multiply in it: never autocast."""
    if weights_dtype != "float32":
        return "float32"
    if setting == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return setting


@contextlib.contextmanager
def compute_dtype(name: str) -> Iterator[None]:
    """Inside the block, :func:`autocast_forward` multiplies in ``name`` (``float32``: no autocast)."""
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"compute dtype '{name}' is not concrete (resolve 'auto' first)")
    token = _ACTIVE.set(torch.bfloat16 if name == "bfloat16" else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def autocast_forward(device: torch.device) -> contextlib.AbstractContextManager:
    """torch's autocast at the active compute dtype on ``device``'s kind (a no-op at float32)."""
    dtype = _ACTIVE.get()
    if dtype is None or device.type not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(function: Callable) -> Callable:
    """``function`` with autocast switched off: statistics taken inside a forward keep float32 products."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for kind in AUTOCAST_DEVICES:
                if torch.is_autocast_enabled(kind):
                    stack.enter_context(torch.autocast(kind, enabled=False))
            return function(*args, **kwargs)
    return wrapper
