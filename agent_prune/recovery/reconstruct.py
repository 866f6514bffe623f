"""Local reconstruction: refit a pruned layer's output projections toward the dense sub-block.

After a width cut, ``o_proj`` and ``down_proj`` of a layer see fewer input features. Each touched
projection is refitted in closed form (ridge least squares, :mod:`.ridge`) so that, **on the inputs
the pruned model itself feeds that sub-block**, it reproduces what the dense sub-block (the dense
attention or MLP of the same original layer) would output for those inputs. This is the structured
layer-wise reconstruction of SparseGPT/OBC (Frantar & Alistarh, arXiv 2301.00774) and ZipLM
(arXiv 2302.04089); for one MLP it is exactly the structured OBS update of the kept ``down_proj``
columns (the least-squares optimum over the same activations).

Why a local target: an earlier version aimed each refit at the dense *residual stream* (absorbing
the error carried in from earlier layers and removed layers). It lowered the blocks' calibration
error but raised WikiText-2 test perplexity of every loop model on the GPU comparison (20%: 64.6 ->
84.3, docs/benchmarks.md): a projection bent to cancel upstream drift on 16 C4 windows over-fits them.
The local target asks each projection only to stand in for the channels it lost, which holds up on
held-out text (docs/benchmarks.md, "Compensation").

The walk is sequential ("true sequential" SparseGPT): a layer's inputs come from the pruned model as
refitted so far. Only the hidden states entering the current layer are held.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from agent_prune.actions.surgery import slice_mlp
from agent_prune.errors import InputError
from agent_prune.models.adapters import FamilyAdapter, adapter_for
from agent_prune.models.mapped import drop_mapped_pages
from agent_prune.models.offload import materialized
from agent_prune.models.precision import autocast_forward
from agent_prune.models.streaming import (
    WALK_BATCH_TOKENS,
    batch_slices,
    capture_layer_inputs,
    run_layer,
    tap,
    windows_per_batch,
)
from agent_prune.recovery.layout import Layout, kept_inputs, layer_sources, mark_overridden
from agent_prune.recovery.ridge import LeastSquaresCollector

ATTN_OUT = "self_attn.o_proj"
MLP_OUT = "mlp.down_proj"
# Per-feature ridge toward the dense weights on the kept inputs (:mod:`.ridge`), chosen by measurement: on
# one-shot L2 cuts of the shared model it gave the lowest held-out refit error and WikiText-2 test
# perplexity of 0.03-1.0 (docs/benchmarks.md, "The refit's prior").
DEFAULT_RIDGE = 0.3


class Watch(Protocol):
    """What the walk tells a watch over a layer's last pass (``sensitivity.measure.LayerMeasure``)."""

    def add_down(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None: ...
    def observe(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None: ...
    def detach(self) -> None: ...  # unhook without reading (the walk failed)
    def close(self) -> object: ...


Measure = Callable[[int, nn.Module, bool], Watch]  # (layer index, layer, defer_down) -> an open watch


class LayerRefit(BaseModel):
    """What reconstruction did to one pruned layer: squared error of its last refitted projection's
    output against the dense sub-block's output on the same inputs, relative to that target's energy
    (both less the projection's own bias, e.g. the fluctuation pruner's: the part the fit can change)."""

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
    prior: str
    seconds: float


def override_key(source: int, module: str) -> str:
    """Stable name of a module inside original layer ``source`` (the manifest's module key)."""
    return f"L{source}.{module}"


def reconstruct(
    pruned: nn.Module,
    dense: nn.Module,
    manifest: Layout,
    windows: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
    prior: str = "dense",
    heldout: int = 0,
    scope: str = "touched",
    first_changed: int = 0,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    measure: Measure | None = None,
) -> ReconstructionReport:
    """Refit ``pruned`` in place toward ``dense``'s sub-blocks; returns per-layer errors.

    ``manifest`` is the pruning manifest (refit modules are marked overridden in it, so checkpoints
    keep their values) or just the dense index of each pruned layer. ``prior``: what the ridge pulls
    toward, ``dense`` (the dense projection's weight on the kept inputs, from the manifest; with a
    plain list of sources, the projection's weight as it is, the same for a layer cut once) or
    ``zero`` (plain ridge regression, this package's refit before 2026-12-06). The last ``heldout``
    windows are not fitted on, only measured (their statistics take a second ``d_in x d_in`` float64
    matrix a projection). ``scope``: ``touched`` refits the projections whose
    inputs were cut; ``all`` refits both projections of every layer. ``first_changed``: the first
    layer whose weights or inputs differ from when the model was last reconstructed on the same
    ``windows``; layers before it would refit to what they hold, so they are only walked through.
    ``measure(index, layer, defer_down)``: a watch over each layer's last pass (its statistics as
    refitted, e.g. :class:`~agent_prune.sensitivity.measure.WalkProfile`); the walk then goes on
    through every layer. With nothing to refit there is no walk and nothing is measured.
    """
    started = time.perf_counter()
    sources = layer_sources(manifest)
    p_adapter, d_adapter = adapter_for(pruned), adapter_for(dense)
    _check_inputs(p_adapter, d_adapter, sources, windows, heldout, scope, prior)
    windows = windows.to(next(pruned.parameters()).device)  # calibration ids may sit on the CPU
    n_fit = windows.shape[0] - heldout
    batch_size = batch_size or windows_per_batch(WALK_BATCH_TOKENS, windows.shape[1])
    plan = [_modules_to_refit(p_adapter, d_adapter, layer, d_adapter.layers()[source], scope)
            if index >= first_changed else []
            for index, (layer, source) in enumerate(zip(p_adapter.layers(), sources))]
    last = max((i for i, modules in enumerate(plan) if modules), default=-1)
    if measure is not None and last >= 0:
        last = len(plan) - 1  # measured layers need the stream however far the refits go
    stream, kwargs = None, []  # nothing to refit (a depth cut): no walk at all
    if last >= 0:
        inputs = capture_layer_inputs(p_adapter, windows, batch_size, windows.device)
        stream, kwargs = inputs.hidden, inputs.kwargs
    parts = _parts(windows.shape[0], n_fit, batch_size)
    records, overrides = [], []
    for index, source in enumerate(sources):
        modules = plan[index]
        if index > last:  # past the last refit the stream is not needed
            records.append(_record(index, source, [], None))
            continue
        layer, dense_layer = p_adapter.layers()[index], d_adapter.layers()[source]
        with materialized(layer, write=bool(modules)), materialized(dense_layer):  # offloaded: one pair
            kept = kept_inputs(manifest, index, d_adapter.head_dim)
            fits = [_fit_for(m, prior, kept, p_adapter, d_adapter, layer, dense_layer) for m in modules]
            open_watch = partial(measure, index, layer) if measure is not None else None
            errors = _refit_layer(p_adapter, layer, fits, stream, parts, kwargs[index], ridge, open_watch)
        drop_mapped_pages(dense_layer)  # the walk is past it: a mapped dense layer leaves the resident set
        records.append(_record(index, source, modules, errors))
        overrides += [override_key(source, m) for m in modules]
        for module in modules:
            mark_overridden(manifest, index, module)
        if progress is not None:
            progress(index + 1, len(sources))
    return ReconstructionReport(
        layers=records, overrides=overrides, fit_tokens=n_fit * windows.shape[1],
        heldout_tokens=heldout * windows.shape[1], ridge=ridge, prior=prior,
        seconds=time.perf_counter() - started,
    )


class _Fit(NamedTuple):
    """How one output projection is refitted: ``target`` runs beside ``block`` on the same inputs and
    gives the regression target ``Y`` (less the projection's bias); with an ``offset`` weight ``W0``
    the whole target is ``x W0^T + Y`` (:class:`~.ridge.LeastSquaresCollector`); the ridge pulls
    toward ``prior`` (zero when None)."""

    module: str
    block: nn.Module
    target: nn.Module
    projection: nn.Linear
    offset: torch.Tensor | None
    prior: torch.Tensor | None


def _fit_for(module: str, prior: str, kept: dict[str, list[int]] | None, p_adapter: FamilyAdapter,
             d_adapter: FamilyAdapter, layer: nn.Module, dense_layer: nn.Module) -> _Fit:
    """The refit of ``module`` (an output projection of ``layer``, cut from ``dense_layer``).

    ``prior`` (``reconstruct``'s): ``zero``; ``dense``, the dense weight on the inputs ``kept`` says
    were kept, or without them the projection's weight as it is (the dense one, for a layer cut once).
    Where the MLP's kept channels are the dense ones unchanged (gate and up rows equal), the dense MLP's
    output is the kept channels through the dense down_proj columns plus the removed channels' own
    output: only the removed channels run per token, and the dense columns become the fit's offset.
    """
    block, dense_block = ((p_adapter.attention(layer), d_adapter.attention(dense_layer)) if module == ATTN_OUT
                          else (p_adapter.mlp(layer), d_adapter.mlp(dense_layer)))
    projection = _output_projection(p_adapter, layer, module)
    dense_projection = _output_projection(d_adapter, dense_layer, module)
    columns = None if kept is None else dense_projection.weight[:, kept[module]]
    weights = {"zero": None, "dense": projection.weight if columns is None else columns}[prior]
    removed = _removed_channels(block, dense_block, kept[module]) if module == MLP_OUT and kept else None
    if removed is None:
        return _Fit(module, block, dense_block, projection, None, weights)
    # A copy that shares the dense parameters until slicing replaces them: no whole MLP is copied.
    shared = {id(parameter): parameter for parameter in dense_block.parameters()}
    lost_channels = slice_mlp(copy.deepcopy(dense_block, shared), removed)
    return _Fit(module, block, lost_channels, projection, columns, weights)


def _removed_channels(mlp: nn.Module, dense_mlp: nn.Module, kept: list[int]) -> torch.Tensor | None:
    """The dense MLP channels ``mlp`` lost, where its kept channels are the dense ones unchanged
    (None when none were lost or the kept ones changed, e.g. after distillation healing)."""
    index = torch.as_tensor(kept, dtype=torch.long, device=dense_mlp.down_proj.weight.device)
    for name in ("gate_proj", "up_proj"):
        part, dense_part = getattr(mlp, name), getattr(dense_mlp, name)
        if not torch.equal(part.weight, dense_part.weight.index_select(0, index)):
            return None
        if (part.bias is None) != (dense_part.bias is None) or (
                part.bias is not None and not torch.equal(part.bias, dense_part.bias.index_select(0, index))):
            return None
    lost = torch.ones(dense_mlp.down_proj.in_features, dtype=torch.bool, device=index.device)
    lost[index] = False
    return lost.nonzero().flatten() if lost.any() else None


class _Errors(NamedTuple):
    """Relative squared errors of a refitted projection's output against its target, before and
    after the refit, on the fitted windows and on the held-out ones (None without any)."""

    fit_before: float
    fit_after: float
    heldout_before: float | None
    heldout_after: float | None


def _refit_layer(p_adapter: FamilyAdapter, layer: nn.Module, fits: list[_Fit], stream: torch.Tensor, parts,
                 kwargs: dict, ridge: float, open_watch: Callable[[bool], Watch] | None = None
                 ) -> _Errors | None:
    """Refit each of ``fits`` in turn and move the stream on through the layer; returns the errors of
    the last refitted projection. ``open_watch(defer_down)`` opens a watch over the layer's last pass."""
    # When the MLP's down_proj is refitted last and its output goes straight into the residual
    # stream, the refit pass keeps what it saw and the stream moves on by the change of that
    # projection's output alone: no second pass through the layer.
    shortcut = bool(fits) and fits[-1].module == MLP_OUT and p_adapter.projections_feed_residual(layer)
    errors, seen, opened = None, None, None
    try:
        for fit in fits:
            final = shortcut and fit is fits[-1]
            if final and open_watch is not None:  # the layer's last pass; down_proj's new outputs later
                opened = open_watch(True)
            errors, seen = _refit(layer, fit, stream, parts, kwargs, ridge, keep=final)
        if seen is not None:
            _advance_by_projection(fits[-1].projection, seen, stream, parts, opened)
        else:
            opened = open_watch(False) if open_watch is not None else None
            _advance(layer, stream, parts, kwargs, opened)
    except BaseException:
        if opened is not None:
            opened.detach()
        raise
    if opened is not None:
        opened.close()
    return errors


def _output_projection(adapter: FamilyAdapter, layer: nn.Module, module: str) -> nn.Linear:
    if module == ATTN_OUT:
        return adapter.attention_projections(layer)["o_proj"]
    return adapter.mlp_projections(layer)["down_proj"]


def _check_inputs(p_adapter, d_adapter, sources, windows, heldout, scope, prior) -> None:
    if len(sources) != p_adapter.num_layers:
        raise InputError(f"{len(sources)} layer sources for a model with {p_adapter.num_layers} layers",
                         "pass the manifest that produced this pruned model")
    if list(sources) != sorted(set(sources)) or (sources and not 0 <= sources[-1] < d_adapter.num_layers):
        raise InputError(f"layer sources {list(sources)} are not increasing dense layer indices",
                         "pass the manifest that produced this pruned model")
    if windows.ndim != 2 or not 0 <= heldout < windows.shape[0]:
        raise InputError(f"need (windows, seqlen) token ids with fewer than {windows.shape[0]} held out",
                         "pass more calibration windows or hold out fewer")
    if prior not in ("dense", "zero"):
        raise InputError(f"unknown reconstruction prior '{prior}'", "use dense or zero")
    if scope not in ("touched", "all"):
        raise InputError(f"unknown reconstruction scope '{scope}'", "use touched or all")


def _modules_to_refit(p_adapter: FamilyAdapter, d_adapter: FamilyAdapter, layer, dense_layer,
                      scope: str) -> list[str]:
    if scope == "all":
        return [ATTN_OUT, MLP_OUT]
    pruned, full = p_adapter.layer_widths(layer), d_adapter.layer_widths(dense_layer)
    modules = []
    if pruned.num_heads < full.num_heads:
        modules.append(ATTN_OUT)
    if pruned.intermediate_size < full.intermediate_size:
        modules.append(MLP_OUT)
    return modules


def _parts(count: int, n_fit: int, batch_size: int) -> list[tuple[slice, bool]]:
    fit = [(s, True) for s in batch_slices(n_fit, batch_size)]
    held = [(slice(s.start + n_fit, s.stop + n_fit), False)
            for s in batch_slices(count - n_fit, batch_size)]
    return fit + held


class _Targets:
    """While active, every forward of ``block`` also runs ``target`` on the same inputs and keeps its
    output (``value``)."""

    def __init__(self, block: nn.Module, target: nn.Module):
        self.target, self.value = target, None
        self.handle = block.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs, _output):
        self.value = _first(self.target(*args, **kwargs))

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def _refit(layer: nn.Module, fit: _Fit, stream: torch.Tensor, parts, kwargs: dict, ridge: float,
           keep: bool = False) -> tuple[_Errors, list[_Seen] | None]:
    """Refit ``fit.projection`` (the last linear of ``fit.block``) so the block reproduces the dense
    sub-block on the inputs the pruned layer feeds it; returns its errors and, with ``keep``, what
    each part of the stream saw (for :func:`_advance_by_projection`).

    The prior is the dense weight on the kept inputs: a layer refitted again at a later step is then
    pulled toward the same weights, not toward its last refit (which would weaken the ridge step by
    step)."""
    projection = fit.projection
    shape = (projection.in_features, projection.out_features, fit.offset)
    collectors = {fitted: LeastSquaresCollector(*shape) for fitted in {fitted for _, fitted in parts}}
    targets = _Targets(fit.block, fit.target)
    kept: list[_Seen] | None = [] if keep else None
    try:
        with tap(projection) as seen:
            for part, fitted in parts:
                out = run_layer(layer, stream[part], kwargs)
                collectors[fitted].add_batch(seen.inputs, _minus_bias(targets.value, projection))
                if kept is not None:
                    kept.append(_Seen(seen.inputs, seen.outputs, out))
    finally:
        targets.remove()
    energy = {fitted: c.error(None) for fitted, c in collectors.items()}
    before = {fitted: _relative(c, projection.weight, energy[fitted]) for fitted, c in collectors.items()}
    projection.weight.copy_(collectors[True].solve(ridge, fit.prior).to(projection.weight.dtype))
    after = {fitted: _relative(c, projection.weight, energy[fitted]) for fitted, c in collectors.items()}
    for collector in collectors.values():
        collector.free()
    return _Errors(before[True], after[True], before.get(False), after.get(False)), kept


def _relative(collector: LeastSquaresCollector, weight: torch.Tensor, energy: float) -> float | None:
    return collector.error(weight) / energy if energy > 0 else None


class _Seen(NamedTuple):
    """One part of the stream in a refit pass: the projection's input and output and the layer's
    output, all before the refit."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    layer_output: torch.Tensor


@torch.no_grad()
def _advance_by_projection(projection: nn.Linear, seen: list[_Seen], stream: torch.Tensor,
                           parts, watch: Watch | None = None) -> None:
    """Move the stream through a layer whose last refitted projection feeds the residual directly:
    the layer's output changes by exactly the change of that projection's output."""
    for part, _fitted in parts:
        record = seen.pop(0)  # each part's buffers go as soon as the stream has moved past them
        with autocast_forward(record.inputs.device):  # as the layer's own pass multiplied
            output = projection(record.inputs)
        moved = record.layer_output + (output.float() - record.outputs.float())  # float32 as the stream
        if watch is not None:
            watch.add_down(record.inputs, output)
            watch.observe(stream[part], moved)
        stream[part] = moved
        del record, output, moved


@torch.no_grad()
def _advance(layer: nn.Module, stream: torch.Tensor, parts, kwargs: dict, watch: Watch | None = None) -> None:
    """Move the stream through the (refitted) layer (measuring the whole layer when ``watch`` is open)."""
    for part, _fitted in parts:
        output = run_layer(layer, stream[part], kwargs)
        if watch is not None:
            watch.observe(stream[part], output)
        stream[part] = output


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _minus_bias(target: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    return target if module.bias is None else target - module.bias


def _record(index: int, source: int, modules: list[str], errors: _Errors | None) -> LayerRefit:
    """Per layer, the errors of its last refitted projection (the MLP's when both were refit)."""
    if errors is None:
        return LayerRefit(index=index, source=source, modules=[], fit_error_before=0.0, fit_error_after=0.0)
    return LayerRefit(
        index=index, source=source, modules=modules,
        fit_error_before=errors.fit_before, fit_error_after=errors.fit_after,
        heldout_error_before=errors.heldout_before, heldout_error_after=errors.heldout_after,
    )
