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

import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from agent_prune.errors import InputError
from agent_prune.models.adapters import FamilyAdapter, adapter_for
from agent_prune.models.offload import materialized
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
    """What reconstruction did to one pruned layer: relative squared error of each refitted
    projection's output against the dense sub-block's output on the same inputs."""

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
    windows are not fitted on, only measured. ``scope``: ``touched`` refits the projections whose
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
            records.append(_record(index, source, [], {}, None))
            continue
        layer, dense_layer = p_adapter.layers()[index], d_adapter.layers()[source]
        with materialized(layer, write=bool(modules)), materialized(dense_layer):  # offloaded: one pair
            priors = _priors(prior, modules, manifest, index, p_adapter, d_adapter, layer, dense_layer)
            open_watch = partial(measure, index, layer) if measure is not None else None
            after, before = _refit_layer(p_adapter, d_adapter, layer, dense_layer, modules, stream, parts,
                                         kwargs[index], ridge, priors, open_watch)
        records.append(_record(index, source, modules, before, after))
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


def _refit_layer(p_adapter: FamilyAdapter, d_adapter: FamilyAdapter, layer: nn.Module, dense_layer: nn.Module,
                 modules: list[str], stream: torch.Tensor, parts, kwargs: dict, ridge: float,
                 priors: dict[str, torch.Tensor | None], open_watch: Callable[[bool], Watch] | None = None
                 ) -> tuple[_Errors | None, dict[str, _Errors]]:
    """Refit ``modules`` of one layer toward the dense layer's sub-blocks (the ridge pulling each
    toward its entry of ``priors``) and move the stream on through it; returns the errors after (of
    the last refitted block) and before each refit. ``open_watch(defer_down)`` opens a watch over
    the layer's last pass."""
    blocks = {ATTN_OUT: (p_adapter.attention(layer), d_adapter.attention(dense_layer),
                         p_adapter.attention_projections(layer)["o_proj"]),
              MLP_OUT: (p_adapter.mlp(layer), d_adapter.mlp(dense_layer),
                        p_adapter.mlp_projections(layer)["down_proj"])}
    # When the MLP's down_proj is refitted last and its output goes straight into the residual
    # stream, the refit pass keeps what it saw and the stream moves on by the change of that
    # projection's output alone: no second pass through the layer.
    shortcut = bool(modules) and modules[-1] == MLP_OUT and p_adapter.projections_feed_residual(layer)
    before, seen, opened = {}, None, None
    try:
        for m in modules:
            final = shortcut and m == modules[-1]
            if final and open_watch is not None:  # the layer's last pass; down_proj's new outputs later
                opened = open_watch(True)
            before[m], seen = _refit(layer, *blocks[m], stream, parts, kwargs, ridge, priors[m], keep=final)
        if seen is not None:
            after = _advance_by_projection(blocks[MLP_OUT][2], seen, stream, parts, opened)
        else:
            opened = open_watch(False) if open_watch is not None else None
            watched = blocks[modules[-1]][:2] if modules else None
            after = _advance(layer, watched, stream, parts, kwargs, opened)
    except BaseException:
        if opened is not None:
            opened.detach()
        raise
    if opened is not None:
        opened.close()
    return after, before


def _priors(prior: str, modules: list[str], manifest: Layout, index: int, p_adapter: FamilyAdapter,
            d_adapter: FamilyAdapter, layer: nn.Module, dense_layer: nn.Module
            ) -> dict[str, torch.Tensor | None]:
    """What the ridge pulls each of ``modules`` (output projections of current layer ``index``) toward
    (``reconstruct``'s ``prior``): None (zero), the dense weight on the inputs the manifest says it
    kept, or without a manifest the projection's weight as it is (the dense one, for a layer cut once)."""
    if prior == "zero":
        return dict.fromkeys(modules)
    kept = kept_inputs(manifest, index, d_adapter.head_dim)
    if kept is None:
        return {m: _output_projection(p_adapter, layer, m).weight for m in modules}
    return {m: _output_projection(d_adapter, dense_layer, m).weight[:, kept[m]] for m in modules}


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


class _Errors:
    """Squared error and squared target of a projection's output, fitted and held-out windows apart."""

    def __init__(self):
        self.sums = {True: [0.0, 0.0], False: [0.0, 0.0]}

    def add(self, fitted: bool, output: torch.Tensor, target: torch.Tensor) -> None:
        diff = (output - target).double()
        self.sums[fitted][0] += float((diff * diff).sum())
        self.sums[fitted][1] += float((target.double() ** 2).sum())

    def relative(self, fitted: bool) -> float | None:
        err, ref = self.sums[fitted]
        return err / ref if ref > 0 else None


class _DenseTargets:
    """While active, every forward of ``block`` also runs ``dense_block`` on the same inputs; the
    last pair is kept (``output``, ``target``) and added to ``errors`` if one is set."""

    def __init__(self, block: nn.Module, dense_block: nn.Module):
        self.dense_block = dense_block
        self.output = self.target = None
        self.errors: _Errors | None = None
        self.fitted = True
        self.handle = block.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs, output):
        self.target = _first(self.dense_block(*args, **kwargs))
        self.output = _first(output)
        if self.errors is not None:
            self.errors.add(self.fitted, self.output, self.target)

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def _refit(layer: nn.Module, block: nn.Module, dense_block: nn.Module, projection: nn.Linear,
           stream: torch.Tensor, parts, kwargs: dict, ridge: float, prior: torch.Tensor | None = None,
           keep: bool = False) -> tuple[_Errors, list[_Seen] | None]:
    """Refit ``projection`` (the last linear of ``block``) so ``block`` reproduces ``dense_block`` on
    the inputs the pruned layer feeds it; returns the errors before the refit and, with ``keep``,
    what each part of the stream saw (for :func:`_advance_by_projection`).

    The ridge pulls toward ``prior`` (zero when None). The dense projection's weight on the kept
    inputs is the one to use: a layer refitted again at a later step is then pulled toward the same
    weights, not toward its last refit (which would weaken the ridge step by step)."""
    collector = LeastSquaresCollector(projection.in_features, projection.out_features)
    targets = _DenseTargets(block, dense_block)
    targets.errors = before = _Errors()
    kept: list[_Seen] | None = [] if keep else None
    try:
        with tap(projection) as seen:
            for part, fitted in parts:
                targets.fitted = fitted
                out = run_layer(layer, stream[part], kwargs)
                if fitted:
                    collector.add_batch(seen.inputs, _minus_bias(targets.target, projection))
                if kept is not None:
                    kept.append(_Seen(seen.inputs, seen.outputs, targets.target, out))
    finally:
        targets.remove()
    projection.weight.copy_(collector.solve(ridge, prior).to(projection.weight.dtype))
    collector.free()
    return before, kept


class _Seen(NamedTuple):
    """One part of the stream in a refit pass: the projection's input and output, the dense
    sub-block's output (the target) and the layer's output, all before the refit."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    target: torch.Tensor
    layer_output: torch.Tensor


@torch.no_grad()
def _advance_by_projection(projection: nn.Linear, seen: list[_Seen], stream: torch.Tensor,
                           parts, watch: Watch | None = None) -> _Errors:
    """Move the stream through a layer whose last refitted projection feeds the residual directly:
    the layer's output changes by exactly the change of that projection's output."""
    errors = _Errors()
    for part, fitted in parts:
        record = seen.pop(0)  # each part's buffers go as soon as the stream has moved past them
        output = projection(record.inputs)
        errors.add(fitted, output, record.target)
        moved = record.layer_output + (output - record.outputs)
        if watch is not None:
            watch.add_down(record.inputs, output)
            watch.observe(stream[part], moved)
        stream[part] = moved
        del record, output, moved
    return errors


@torch.no_grad()
def _advance(layer: nn.Module, block: tuple[nn.Module, nn.Module] | None, stream: torch.Tensor, parts,
             kwargs: dict, watch: Watch | None = None) -> _Errors | None:
    """Move the stream through the (refitted) layer, measuring ``block`` (the last refitted one)
    against its dense counterpart on the way (and the whole layer when ``watch`` is open)."""
    targets = _DenseTargets(*block) if block is not None else None
    if targets is not None:
        targets.errors = _Errors()
    try:
        for part, fitted in parts:
            if targets is not None:
                targets.fitted = fitted
            output = run_layer(layer, stream[part], kwargs)
            if watch is not None:
                watch.observe(stream[part], output)
            stream[part] = output
    finally:
        if targets is not None:
            targets.remove()
    return targets.errors if targets is not None else None


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _minus_bias(target: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    return target if module.bias is None else target - module.bias


def _record(index: int, source: int, modules: list[str], before: dict, after: _Errors | None
            ) -> LayerRefit:
    """Per layer, the errors of its last refitted projection (the MLP's when both were refit)."""
    if not modules:
        return LayerRefit(index=index, source=source, modules=[], fit_error_before=0.0, fit_error_after=0.0)
    first = before[modules[-1]]
    return LayerRefit(
        index=index, source=source, modules=modules,
        fit_error_before=first.relative(True), fit_error_after=after.relative(True),
        heldout_error_before=first.relative(False), heldout_error_after=after.relative(False),
    )
