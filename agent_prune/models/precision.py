"""The dtype a run's forward passes multiply in (``--compute-dtype``), apart from the weights' dtype.

The loop's calibration walks (profile, refit) and its candidate scoring are matrix products of
float32 weights; on a CPU with AVX512-BF16 (or AMX), or a GPU with bfloat16 units, bfloat16 runs
them faster. Two ways, by what the pass needs:

- Calibration walks fit and measure float32 weights, so they run under torch's autocast
  (:func:`autocast_forward`): bfloat16 products with float32 accumulation while the weights, the
  residual stream and every statistic stay float32; statistics computed inside a forward (collector
  hooks) are wrapped in :func:`full_precision`, so their products stay float32.
- Scoring only reads a model, so it runs a bfloat16 copy (:func:`evaluated_in`): the whole forward
  in bfloat16 with no per-call weight casts, about twice as fast as float32 on the shared model. Its
  MLP widths are padded to shared shapes (:func:`pad_mlp_widths`): oneDNN keeps a kernel per shape.
  The softmaxes upcast the logits to float32; rotary and other buffers keep their float32 values.

The report's before/after evaluation uses it only when asked (``--report-dtype compute``: the same
bfloat16 copy); by default its figures, like speed's always, are of the weights as exported. The run
sets the dtype around its passes with :func:`compute_dtype`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from agent_prune.heap import release_memory
from agent_prune.models.adapters import adapter_for
from agent_prune.models.offload import is_offloaded

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


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its floating-point parameters cast to ``dtype`` in place (buffers keep theirs:
    rotary frequencies rounded to bfloat16 would shift every position's angle)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


# oneDNN builds and keeps a bfloat16 kernel, with its buffers, for each matrix shape it multiplies; a
# pruned model's layers each have an MLP width of their own, and one candidate of the shared model left
# 630 MiB of kernels behind (about 20 MiB a width; bench/bf16_scoring.py). Padded with zero channels to
# a multiple of this, widths share kernels across layers and candidates.
SHARED_WIDTH = 256


def pad_mlp_widths(model: nn.Module, multiple: int = SHARED_WIDTH) -> nn.Module:
    """``model`` with each layer's MLP widened in place, by zero channels, to a multiple of ``multiple``:
    a zero column of ``down_proj`` adds nothing, whatever its channel's activation (same function)."""
    adapter = adapter_for(model)
    for layer in adapter.layers():
        projections = adapter.mlp_projections(layer)
        extra = -projections["down_proj"].in_features % multiple
        if extra:
            for name in ("gate_proj", "up_proj"):
                _pad_linear(projections[name], rows=extra)
            _pad_linear(projections["down_proj"], columns=extra)
    return model


def _pad_linear(linear: nn.Linear, rows: int = 0, columns: int = 0) -> None:
    """Zero output features (and bias entries) ``rows`` and zero input features ``columns`` appended."""
    weight = F.pad(linear.weight.detach(), (0, columns, 0, rows))
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)  # see cast_copy
    if linear.bias is not None and rows:
        bias = F.pad(linear.bias.detach(), (0, rows))
        linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with its floating-point parameters in ``dtype``, made without a full-precision
    copy first; tied parameters stay tied, and each keeps its ``requires_grad``.

    Why ``requires_grad`` matters in a pass without gradients: torch's ``matmul`` folds a strided 3-D
    input (the last position that ``logits_to_keep=1`` slices off a batch) into one matrix product only
    when the weight requires grad; otherwise it expands the weight once per row for a batched product.
    For the shared model's head in a batch of 32 generations that was a 1.8 GB copy per call: the
    README run's dense FreebaseQA on a bfloat16 copy took 101 s against 48 s, peaking at 3808 MiB
    against 2256 (docs/benchmarks.md, "The report in bfloat16")."""
    memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            for p in model.parameters() if p.is_floating_point() and p.dtype != dtype}
    return copy.deepcopy(model, memo)


def casts(model: nn.Module) -> bool:
    """Whether :func:`evaluated_in` gives another model than ``model`` itself in the active compute
    dtype: a bfloat16 one, float32 weights, layers not offloaded. An offloaded replay shares the base
    model's embeddings and head (offload.shared_memo): cast in place, they would turn the base model
    to bfloat16 for every later build and the export; its layers are read from their homes as stored."""
    return (_ACTIVE.get() is not None and next(model.parameters()).dtype == torch.float32
            and not is_offloaded(model))


@contextlib.contextmanager
def evaluated_in(model: nn.Module, *, owned: bool = False) -> Iterator[nn.Module]:
    """``model`` with its weights in the active compute dtype and, on CPU, its MLP widths padded to
    shared shapes (:func:`pad_mlp_widths`), for a pass that only reads it: made so in place when the
    caller ``owned`` it and gives it up (a candidate's throwaway replay), else a copy for the block.
    At float32, or for a model whose layers are offloaded, ``model`` itself (:func:`casts`)."""
    if not casts(model):
        yield model
    else:
        dtype = _ACTIVE.get()
        cast = cast_parameters(model, dtype) if owned else cast_copy(model, dtype)
        if next(cast.parameters()).device.type == "cpu":
            # the kernels kept per shape are oneDNN's (CPU); CUDA's bfloat16 products need no padding
            pad_mlp_widths(cast)
            # The float32 weights cast away (and the unpadded ones) were heap blocks under the mmap
            # threshold: freed, they stay resident beside the pass's working set unless trimmed.
            release_memory()
        yield cast
