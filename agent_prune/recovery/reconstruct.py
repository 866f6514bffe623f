"""Local reconstruction: refit a pruned model's output projections so each block matches the dense one.

After a width cut, ``o_proj`` and ``down_proj`` of a layer see fewer input features; after a depth
cut, the block before a gap no longer feeds what the removed layers would have added. Following the
layer-wise reconstruction of SparseGPT/OBC (Frantar & Alistarh, arXiv 2301.00774) and its
structured form in ZipLM (Kurtic et al., arXiv 2302.04089), each touched layer's ``o_proj`` and
``down_proj`` are refitted in closed form (ridge least squares, :mod:`.ridge`) so that the block's
output reproduces the dense model's. For depth cuts this is the linear, closed-form analogue of
LLM-Streamline's replacement of pruned layers by a fitted lightweight map (Chen et al., arXiv
2403.19135): the kept block before a gap is refitted to emit the dense residual stream entering the
next kept layer.

The walk is sequential (the "true sequential" mode of SparseGPT): inputs come from the pruned model
as refitted so far and targets from the dense model, so errors are corrected rather than compounded.
Only the hidden states entering the current layer are held (one stream per model).

Two target modes:
- ``residual`` (blocks add ``o_proj``/``down_proj`` outputs straight into the residual stream, as in
  Llama, Mistral, Qwen): the projection is fitted so that ``residual_pruned + W x`` equals the dense
  residual stream, absorbing the error carried in from earlier layers and the effect of removed layers.
- ``output`` (blocks with norms after the projections, Gemma 2/3): the projection is fitted to
  reproduce the dense projection's output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel
from torch import nn

from agent_prune.errors import InputError
from agent_prune.models.adapters import FamilyAdapter, adapter_for
from agent_prune.recovery.layout import Layout, layer_sources, mark_overridden
from agent_prune.recovery.ridge import LeastSquaresCollector
from agent_prune.recovery.streaming import batches, embed, layer_kwargs, run_layer, tap

ATTN_OUT = "self_attn.o_proj"
MLP_OUT = "mlp.down_proj"


class LayerRefit(BaseModel):
    """What reconstruction did to one pruned layer; errors are relative squared errors of the block
    output against the dense residual stream entering the next kept layer, on the same inputs."""

    index: int
    source: int
    modules: list[str]
    fit_error_before: float
    fit_error_after: float
    heldout_error_before: float | None = None
    heldout_error_after: float | None = None


class ReconstructionReport(BaseModel):
    layers: list[LayerRefit]
    overrides: list[str]  # stable keys of the refitted modules, e.g. "L12.mlp.down_proj"
    fit_tokens: int
    heldout_tokens: int
    ridge: float
    mode: str
    seconds: float

    @property
    def heldout_error_before(self) -> float | None:
        return self.layers[-1].heldout_error_before if self.layers else None


@dataclass
class _Streams:
    """Hidden states for every calibration window: dense at ``dense_at``, pruned at the current layer."""

    dense: torch.Tensor
    pruned: torch.Tensor
    dense_at: int = 0


def override_key(source: int, module: str) -> str:
    """Stable name of a module inside original layer ``source`` (the manifest's module key)."""
    return f"L{source}.{module}"


def reconstruct(
    pruned: nn.Module,
    dense: nn.Module,
    manifest: Layout,
    windows: torch.Tensor,
    *,
    ridge: float = 1e-2,
    heldout: int = 0,
    scope: str = "touched",
    target: str = "auto",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> ReconstructionReport:
    """Refit ``pruned`` in place so its blocks reproduce ``dense``'s; returns per-layer errors.

    ``manifest`` is the pruning manifest (refit modules are marked overridden in it, so checkpoints
    keep their values) or just the dense index of each pruned layer. The last ``heldout`` windows are not
    fitted on, only measured. ``scope``: ``touched`` refits layers whose width changed or that
    precede a gap; ``all`` refits every layer (also correcting upstream error). ``target``: ``auto``
    (residual where the family allows it), ``residual`` or ``output`` (see the module docstring).
    """
    started = time.perf_counter()
    sources = layer_sources(manifest)
    p_adapter, d_adapter = adapter_for(pruned), adapter_for(dense)
    _check_inputs(p_adapter, d_adapter, sources, windows, heldout, scope)
    windows = windows.to(next(pruned.parameters()).device)  # calibration ids may sit on the CPU
    mode = _mode(p_adapter, target)
    n_fit = windows.shape[0] - heldout
    p_kwargs, d_kwargs = layer_kwargs(p_adapter, windows[0]), layer_kwargs(d_adapter, windows[0])
    with torch.no_grad():
        first = embed(p_adapter, windows)
        streams = _Streams(dense=embed(d_adapter, windows), pruned=first.clone())
    del first
    records, overrides = [], []
    for index, source in enumerate(sources):
        next_source = sources[index + 1] if index + 1 < len(sources) else d_adapter.num_layers
        with torch.no_grad():
            _advance_dense(d_adapter, streams, source, d_kwargs, batch_size)
        modules = _modules_to_refit(p_adapter, d_adapter, index, source, next_source, scope, mode)
        record = _refit_layer(p_adapter, d_adapter, streams, index, source, next_source, modules,
                              p_kwargs[index], d_kwargs, n_fit, ridge, batch_size, mode == "residual")
        records.append(record)
        overrides += [override_key(source, m) for m in modules]
        for module in modules:
            mark_overridden(manifest, index, module)
        if progress is not None:
            progress(index + 1, len(sources))
    return ReconstructionReport(
        layers=records, overrides=overrides, fit_tokens=n_fit * windows.shape[1],
        heldout_tokens=heldout * windows.shape[1], ridge=ridge, mode=mode,
        seconds=time.perf_counter() - started,
    )


def _check_inputs(p_adapter, d_adapter, sources, windows, heldout, scope) -> None:
    if len(sources) != p_adapter.num_layers:
        raise InputError(f"{len(sources)} layer sources for a model with {p_adapter.num_layers} layers",
                         "pass the manifest that produced this pruned model")
    if list(sources) != sorted(set(sources)) or (sources and not 0 <= sources[-1] < d_adapter.num_layers):
        raise InputError(f"layer sources {list(sources)} are not increasing dense layer indices",
                         "pass the manifest that produced this pruned model")
    if windows.ndim != 2 or not 0 <= heldout < windows.shape[0]:
        raise InputError(f"need (windows, seqlen) token ids with fewer than {windows.shape[0]} held out",
                         "pass more calibration windows or hold out fewer")
    if scope not in ("touched", "all"):
        raise InputError(f"unknown reconstruction scope '{scope}'", "use touched or all")


def _mode(adapter: FamilyAdapter, target: str) -> str:
    feeds_residual = adapter.projections_feed_residual(adapter.layers()[0])
    if target == "residual" and not feeds_residual:
        raise InputError(f"{adapter.config.model_type} normalises block outputs, so residual targets do "
                         "not apply", "use target='output' or 'auto'")
    if target not in ("auto", "residual", "output"):
        raise InputError(f"unknown reconstruction target '{target}'", "use auto, residual or output")
    return "residual" if target == "residual" or (target == "auto" and feeds_residual) else "output"


def _modules_to_refit(p_adapter, d_adapter, index, source, next_source, scope, mode) -> list[str]:
    if scope == "all":
        return [ATTN_OUT, MLP_OUT]
    pruned_widths = p_adapter.layer_widths(p_adapter.layers()[index])
    dense_widths = d_adapter.layer_widths(d_adapter.layers()[source])
    gap_follows = next_source > source + 1
    modules = []
    if pruned_widths.num_heads < dense_widths.num_heads or (gap_follows and mode == "residual"):
        modules.append(ATTN_OUT)
    if pruned_widths.intermediate_size < dense_widths.intermediate_size or modules:
        modules.append(MLP_OUT)
    return modules


def _advance_dense(adapter, streams: _Streams, target: int, kwargs, batch_size) -> None:
    """Run the dense stream through its layers until it enters layer ``target``."""
    while streams.dense_at < target:
        layer = adapter.layers()[streams.dense_at]
        for part in batches(streams.dense.shape[0], batch_size):
            streams.dense[part] = run_layer(layer, streams.dense[part], kwargs[streams.dense_at])
        streams.dense_at += 1


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    diff = (output - target).double()
    return float((diff * diff).sum()), float((target.double() ** 2).sum())


class _ErrorSums:
    """Squared error and squared target, split into fitted and held-out windows."""

    def __init__(self):
        self.sums = {True: [0.0, 0.0], False: [0.0, 0.0]}

    def add(self, fitted: bool, output: torch.Tensor, target: torch.Tensor) -> None:
        err, ref = _relative_error(output, target)
        self.sums[fitted][0] += err
        self.sums[fitted][1] += ref

    def relative(self, fitted: bool) -> float | None:
        err, ref = self.sums[fitted]
        return err / ref if ref > 0 else None


def _parts(count: int, n_fit: int, batch_size: int) -> list[tuple[slice, bool]]:
    fit = [(s, True) for s in batches(n_fit, batch_size)]
    held = [(slice(s.start + n_fit, s.stop + n_fit), False) for s in batches(count - n_fit, batch_size)]
    return fit + held


@torch.no_grad()
def _dense_references(d_adapter, streams, source, next_source, d_kwargs, batch_size, residual):
    """Targets for ``o_proj`` (dense mid-block residual, or dense o_proj output) and, in output mode,
    for ``down_proj``; advances the dense stream to the residual entering ``next_source``."""
    layer = d_adapter.layers()[source]
    projections = d_adapter.attention_projections(layer) | d_adapter.mlp_projections(layer)
    attn_ref = torch.empty_like(streams.dense)
    mlp_ref = None if residual else torch.empty_like(streams.dense)
    with tap(projections["o_proj"]) as attn_tap, tap(projections["down_proj"]) as mlp_tap:
        for part in batches(streams.dense.shape[0], batch_size):
            entering = streams.dense[part]
            out = run_layer(layer, entering, d_kwargs[source])
            attn_ref[part] = entering + attn_tap.outputs if residual else attn_tap.outputs
            if mlp_ref is not None:
                mlp_ref[part] = mlp_tap.outputs
            streams.dense[part] = out
    streams.dense_at = source + 1
    _advance_dense(d_adapter, streams, next_source, d_kwargs, batch_size)
    return attn_ref, mlp_ref


@torch.no_grad()
def _refit_layer(p_adapter, d_adapter, streams, index, source, next_source, modules, kwargs, d_kwargs,
                 n_fit, ridge, batch_size, residual: bool) -> LayerRefit:
    attn_ref, mlp_ref = _dense_references(d_adapter, streams, source, next_source, d_kwargs,
                                          batch_size, residual)
    layer = p_adapter.layers()[index]
    outs = p_adapter.attention_projections(layer) | p_adapter.mlp_projections(layer)
    parts = _parts(streams.pruned.shape[0], n_fit, batch_size)
    block_target = streams.dense
    before = None
    if ATTN_OUT in modules:
        before = _refit_attention(layer, outs["o_proj"], streams, parts, kwargs, attn_ref, block_target,
                                  ridge, residual)
    errors, after = _refit_mlp(layer, outs["down_proj"], MLP_OUT in modules, streams, parts, kwargs,
                               mlp_ref, block_target, ridge, residual)
    before = before or errors
    return LayerRefit(
        index=index, source=source, modules=modules,
        fit_error_before=before.relative(True), fit_error_after=after.relative(True),
        heldout_error_before=before.relative(False), heldout_error_after=after.relative(False),
    )


def _refit_attention(layer, o_proj: nn.Linear, streams, parts, kwargs, attn_ref, block_target, ridge,
                     residual) -> _ErrorSums:
    """One pass collecting ``o_proj``'s inputs and targets, then its ridge refit; returns the block's
    errors before the refit."""
    collector = LeastSquaresCollector(o_proj.in_features, o_proj.out_features)
    errors = _ErrorSums()
    with tap(o_proj) as seen:
        for part, fitted in parts:
            out = run_layer(layer, streams.pruned[part], kwargs)
            errors.add(fitted, out, block_target[part])
            if fitted:
                target = attn_ref[part] - streams.pruned[part] if residual else attn_ref[part]
                collector.add_batch(seen.inputs, _minus_bias(target, o_proj))
    o_proj.weight.copy_(collector.solve(ridge).to(o_proj.weight.dtype))
    return errors


def _refit_mlp(layer, down: nn.Linear, refit: bool, streams, parts, kwargs, mlp_ref, block_target, ridge,
               residual) -> tuple[_ErrorSums, _ErrorSums]:
    """One pass through the layer (refitting ``down`` if asked) that also advances the pruned stream.

    In residual mode the refitted block output is ``mid + down(x)`` with ``mid`` and ``x`` kept from
    the pass, so the layer is not run again; otherwise it is rerun after the refit.
    """
    collector = LeastSquaresCollector(down.in_features, down.out_features) if refit else None
    before, after, kept = _ErrorSums(), _ErrorSums(), []
    with tap(down) as seen:
        for part, fitted in parts:
            out = run_layer(layer, streams.pruned[part], kwargs)
            before.add(fitted, out, block_target[part])
            mid = out - seen.outputs
            if collector is not None and fitted:
                target = block_target[part] - mid if residual else mlp_ref[part]
                collector.add_batch(seen.inputs, _minus_bias(target, down))
            kept.append((part, fitted, out if collector is None else (mid, seen.inputs)))
    if collector is not None:
        down.weight.copy_(collector.solve(ridge).to(down.weight.dtype))
    for part, fitted, value in kept:
        if collector is None:
            out = value
        elif residual:
            out = value[0] + nn.functional.linear(value[1], down.weight, down.bias)
        else:
            out = run_layer(layer, streams.pruned[part], kwargs)
        after.add(fitted, out, block_target[part])
        streams.pruned[part] = out
    return before, after


def _minus_bias(target: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    return target if module.bias is None else target - module.bias
