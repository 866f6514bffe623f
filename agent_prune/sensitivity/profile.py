"""``profile_model``: the layer-streaming driver that produces a :class:`SensitivityProfile`.

One call = (1) capture layer-0 inputs and every layer's kwargs; (2) forward pass, layer by layer,
with collectors (Wanda, AMP structures, depth, super-activation trace), storing each layer's inputs
when gradients are wanted; (3) optional backward pass, layer by layer from the top (see
:mod:`~agent_prune.sensitivity.gradients`); (4) assemble per-layer records, z-scores, protections.

Partial recomputation (``previous`` + ``start_layer=k``, or ``"auto"`` to find ``k``): layers
``< k`` are unchanged since ``previous`` (checked by per-layer fingerprints) and see the same
inputs, so their forward metrics (Block Influence, angular distance, Wanda, structure scores,
super weights) are copied; layers ``>= k`` are measured again. Gradient metrics are always
recomputed for every layer, because ``dL/dW`` of an early layer depends on every layer above it.
With a persistent ``store`` whose entries for layers ``<= k`` are current (same calibration set,
same fingerprints below), the forward through layers ``< k`` is skipped too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from agent_prune.errors import InputError
from agent_prune.heap import release_memory
from agent_prune.models.adapters import FamilyAdapter, adapter_for
from agent_prune.models.loading import resolve_device
from agent_prune.models.streaming import (
    LayerInputs,
    capture_layer_inputs,
    on_device,
    run_layer,
    windows_per_batch,
)
from agent_prune.sensitivity import gradients as grad_pass
from agent_prune.sensitivity import metrics
from agent_prune.sensitivity.activations import ActivationStore, windows_digest
from agent_prune.sensitivity.fingerprints import layer_fingerprint, model_fingerprint, prefix_keys
from agent_prune.sensitivity.layerstats import ForwardStats, GradientStats, gradient_stats
from agent_prune.sensitivity.measure import LayerMeasure
from agent_prune.sensitivity.schema import (
    METRICS,
    CalibrationInfo,
    InputMeans,
    LayerProfile,
    ModelInfo,
    ModuleStats,
    ProfileCost,
    SensitivityProfile,
    Structures,
    SuperWeight,
)
from agent_prune.sensitivity.superweights import SPIKE_MIN, SPIKE_RATIO, protect_super_weights, super_weights

Progress = Callable[[str, int, int], None]
# the default batch: 2 windows of 512 (the backward holds one batch's graph through a layer)
PROFILE_BATCH_TOKENS = 1024


def profile_model(
    model: nn.Module,
    calibration_windows: torch.Tensor,
    *,
    device: str = "cpu",
    gradients: bool = True,
    hessians: bool = False,
    obs_damping: float = metrics.OBS_DAMPING,
    batch_size: int | None = None,
    progress: Progress | None = None,
    layer_sources: list[int] | None = None,
    previous: SensitivityProfile | None = None,
    start_layer: int | str = 0,
    store: ActivationStore | None = None,
    activation_store: str = "disk",
    dataset: str | None = None,
    seed: int | None = None,
    model_name: str | None = None,
    spike_ratio: float = SPIKE_RATIO,
    spike_min: float = SPIKE_MIN,
    loss_chunk_tokens: int = grad_pass.DEFAULT_CHUNK_TOKENS,
) -> SensitivityProfile:
    """Profile ``model`` as it is now on ``calibration_windows`` (LongTensor ``[samples, seqlen]``).

    ``hessians`` also collects each o_proj/down_proj input Gram matrix for OBS structure scores
    (``structures_obs``, damped by ``obs_damping`` times each feature's own ``H_jj``; a few seconds
    per layer on CPU).
    ``layer_sources[i]`` is the dense-model index of current layer ``i`` (default: ``i``).
    ``start_layer`` (with ``previous``) reuses the forward metrics of the layers below it; ``"auto"``
    picks the first layer whose fingerprint or source differs from ``previous``. Weights
    stay where they are; each layer runs on ``device`` while it is measured. ``store`` keeps layer
    inputs between calls (for cheap partial profiles); without it a temporary ``activation_store``
    ("disk" or "memory") is used when gradients are wanted. ``batch_size`` windows run together
    (default: about 1,024 tokens' worth);
    the backward keeps one batch's autograd graph through one layer (about 50 MiB per 512-token
    window on the shared model), so small batches bound the peak.
    """
    started = time.perf_counter()
    adapter = adapter_for(model)
    windows = _check_windows(calibration_windows, model)
    sources = _check_sources(layer_sources, adapter.num_layers)
    digest = windows_digest(windows)
    fingerprints = [layer_fingerprint(layer) for layer in adapter.layers()]
    keys = prefix_keys(digest, fingerprints)
    start_layer = _resolve_start(start_layer, previous, digest, sources, fingerprints)
    if batch_size is None:
        batch_size = windows_per_batch(PROFILE_BATCH_TOKENS, windows.shape[1])
    if batch_size < 1:
        raise InputError(f"batch size {batch_size} is not positive", "use a batch size of 1 or more")
    work = resolve_device(device)
    report = progress or (lambda phase, done, total: None)
    owned = store is None and gradients
    acts = ActivationStore(activation_store) if owned else store
    try:
        with _measuring(model):
            inputs = capture_layer_inputs(adapter, windows, batch_size, work)
            hidden = _inputs_of(adapter, start_layer, inputs, acts, work, keys)
            fresh = {}
            for index in range(start_layer, adapter.num_layers):
                if acts is not None:
                    acts.put(index, hidden, keys[index])
                fresh[index] = _forward_layer(adapter, index, hidden, inputs, work, spike_ratio, spike_min,
                                              obs_damping if hessians else None)
                report("forward", index + 1 - start_layer, adapter.num_layers - start_layer)
            if acts is not None:
                acts.drop_from(adapter.num_layers)  # inputs of layers a depth cut removed
            forward_seconds = time.perf_counter() - started
            grads, loss = (None, None)
            if gradients:
                loss = grad_pass.output_gradient(adapter, hidden, windows, loss_chunk_tokens)
                grads = _backward(adapter, hidden, inputs, acts, work, report)  # hidden now holds dL/dh
    finally:
        if owned:
            acts.close()
    seconds = time.perf_counter() - started
    return assemble_profile(
        model, windows, sources, fresh, fingerprints=fingerprints, previous=previous,
        start_layer=start_layer, grads=grads, loss=loss, gradients=gradients, dataset=dataset,
        seed=seed, model_name=model_name, seconds=round(seconds, 3),
        forward_seconds=round(forward_seconds, 3), device=str(work), batch_size=batch_size,
        activation_store=(acts.kind if acts is not None else "none"),
    )


def assemble_profile(
    model: nn.Module, windows: torch.Tensor, sources: list[int], fresh: dict[int, ForwardStats], *,
    seconds: float, forward_seconds: float, device: str, batch_size: int, activation_store: str,
    fingerprints: list[str] | None = None, previous: SensitivityProfile | None = None,
    start_layer: int = 0, grads: dict[int, GradientStats] | None = None, loss: float | None = None,
    gradients: bool = False, dataset: str | None = None, seed: int | None = None,
    model_name: str | None = None, measured_in: str = "profile",
) -> SensitivityProfile:
    """The profile of ``model`` from its layers' forward statistics ``fresh`` (layers below
    ``start_layer`` copied from ``previous``) and, when measured, their gradient statistics."""
    adapter = adapter_for(model)
    if fingerprints is None:
        fingerprints = [layer_fingerprint(layer) for layer in adapter.layers()]
    layers = _assemble(sources, fingerprints, previous, start_layer, fresh, grads)
    swaps = _super_weights(previous, start_layer, fresh)
    return SensitivityProfile(
        model=_model_info(model, adapter, model_name),
        calibration=CalibrationInfo(
            dataset=dataset, samples=windows.shape[0], seqlen=windows.shape[1], seed=seed,
            tokens=windows.numel(), digest=windows_digest(windows),
        ),
        gradients=gradients,
        calibration_loss=loss,
        layers=layers,
        protected=protect_super_weights(swaps),
        super_weights=swaps,
        cost=ProfileCost(
            seconds=seconds, forward_seconds=forward_seconds,
            gradient_seconds=round(seconds - forward_seconds, 3), device=device, batch_size=batch_size,
            activation_store=activation_store, start_layer=start_layer, measured_in=measured_in,
        ),
    )


# ---- passes ------------------------------------------------------------------------------------
@torch.no_grad()
def _inputs_of(
    adapter: FamilyAdapter, start: int, inputs: LayerInputs, acts: ActivationStore | None,
    work: torch.device, keys: list[str],
) -> torch.Tensor:
    """Inputs of layer ``start``: from the store when its entries are current, else by a plain forward.

    Takes the captured embeddings out of ``inputs`` so that only one full-size buffer exists.
    """
    hidden, inputs.hidden = inputs.hidden, None
    if start > 0 and acts is not None and all(acts.has(i, keys[i]) for i in range(start + 1)):
        return acts.get(start, work)
    for index in range(start):
        if acts is not None:
            acts.put(index, hidden, keys[index])
        layer = adapter.layers()[index]
        with on_device(layer, work):
            for batch in inputs.batches:
                hidden[batch] = run_layer(layer, hidden[batch], inputs.kwargs[index])
    return hidden


@torch.no_grad()
def _forward_layer(
    adapter: FamilyAdapter, index: int, hidden: torch.Tensor, inputs: LayerInputs,
    work: torch.device, spike_ratio: float, spike_min: float, obs_damping: float | None = None,
) -> ForwardStats:
    """Measure layer ``index`` and overwrite ``hidden`` with its outputs, batch by batch (with OBS
    scores at ``obs_damping`` when it is set)."""
    layer = adapter.layers()[index]
    with on_device(layer, work):
        measure = LayerMeasure(adapter, layer, spike_ratio=spike_ratio, spike_min=spike_min,
                               obs_damping=obs_damping)
        try:
            for batch in inputs.batches:
                out = run_layer(layer, hidden[batch], inputs.kwargs[index])
                measure.observe(hidden[batch], out)
                hidden[batch] = out
        finally:
            measure.detach()
        return measure.close()  # trims the heap after the layer's temporaries


def _backward(
    adapter: FamilyAdapter, grad: torch.Tensor, inputs: LayerInputs,
    acts: ActivationStore, work: torch.device, report: Progress,
) -> dict[int, GradientStats]:
    """Gradient statistics of every layer, from the top; ``grad`` is dL/d(last layer's output)."""
    stats: dict[int, GradientStats] = {}
    total = adapter.num_layers
    for index in reversed(range(total)):
        layer = adapter.layers()[index]
        with on_device(layer, work):
            weights = [m.weight for m in adapter.linear_modules(layer).values()]
            grad = grad_pass.layer_backward(
                layer, weights, lambda rows, i=index: acts.get(i, work, rows), grad,
                inputs.batches, inputs.kwargs[index],
            )
            stats[index] = gradient_stats(adapter, layer)
            for weight in weights:
                weight.grad = None
        release_memory()
        report("gradients", total - index, total)
    return stats


class _measuring:
    """Eval mode and no parameter gradients while profiling; restores both afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
            p.grad = None
        self.model.train(self.training)
        return False


# ---- assembly ----------------------------------------------------------------------------------
def _assemble(
    sources: list[int], fingerprints: list[str], previous: SensitivityProfile | None, start: int,
    fresh: dict[int, ForwardStats], grads: dict[int, GradientStats] | None,
) -> list[LayerProfile]:
    layers = []
    for index, source in enumerate(sources):
        if index < start:
            layer = previous.layers[index].model_copy(deep=True, update={"reused": True})
        else:
            layer = _forward_record(index, source, fingerprints[index], fresh[index])
        layers.append(_with_gradients(layer, grads[index] if grads else None))
    return _with_zscores(layers)


def _forward_record(index: int, source: int, fingerprint: str, stats: ForwardStats) -> LayerProfile:
    return LayerProfile(
        index=index, source=source, fingerprint=fingerprint, params=stats.params, nonzero=stats.nonzero,
        num_heads=stats.num_heads, num_kv_heads=stats.num_kv_heads,
        intermediate_size=stats.intermediate_size, block_influence=stats.block_influence,
        angular_distance=stats.angular_distance, wanda=stats.wanda, wanda_p10=stats.wanda_p10,
        modules={name: ModuleStats(**values) for name, values in stats.modules.items()},
        structures=Structures(**stats.structures), structures_l2=Structures(**stats.structures_l2),
        structures_fluctuation=Structures(**stats.structures_fluctuation),
        structures_obs=Structures(**stats.structures_obs) if stats.structures_obs else None,
        input_means=InputMeans(**stats.input_means),
    )


def _with_gradients(layer: LayerProfile, stats: GradientStats | None) -> LayerProfile:
    if stats is None:
        empty = {"gradient": None, "taylor": None}
        modules = {n: m.model_copy(update=empty) for n, m in layer.modules.items()}
        return layer.model_copy(update={"gradient": None, "taylor": None, "structures_taylor": None,
                                        "modules": modules})
    modules = {n: m.model_copy(update=stats.modules[n]) for n, m in layer.modules.items()}
    return layer.model_copy(update={
        "gradient": stats.gradient, "taylor": stats.taylor, "modules": modules,
        "structures_taylor": Structures(**stats.structures),
    })


def _with_zscores(layers: list[LayerProfile]) -> list[LayerProfile]:
    columns = {name: metrics.zscores([getattr(layer, name) for layer in layers]) for name in METRICS}
    return [
        layer.model_copy(update={"z": {name: columns[name][i] for name in METRICS}})
        for i, layer in enumerate(layers)
    ]


def _super_weights(
    previous: SensitivityProfile | None, start: int, fresh: dict[int, ForwardStats]
) -> list[SuperWeight]:
    kept = [sw for sw in (previous.super_weights if previous else []) if sw.layer < start]
    return kept + super_weights({i: s.spikes for i, s in fresh.items()})


def _model_info(model: nn.Module, adapter: FamilyAdapter, name: str | None) -> ModelInfo:
    return ModelInfo(
        name=name, model_type=model.config.model_type, num_layers=adapter.num_layers,
        hidden_size=adapter.hidden_size, head_dim=adapter.head_dim,
        prunable_params=sum(m.weight.numel() for layer in adapter.layers()
                            for m in adapter.linear_modules(layer).values()),
        fingerprint=model_fingerprint(model),
    )


# ---- input checks ------------------------------------------------------------------------------
def _check_windows(windows: torch.Tensor, model: nn.Module) -> torch.Tensor:
    integer = isinstance(windows, torch.Tensor) and windows.dtype in (torch.int64, torch.int32)
    if not integer or windows.dim() != 2:
        raise InputError("calibration windows must be an integer tensor [samples, seqlen]",
                         "build them with agent_prune.data.corpora.calibration_windows")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise InputError(f"calibration windows of shape {tuple(windows.shape)} are too small",
                         "use at least 1 sample of at least 2 tokens")
    vocab = model.config.vocab_size
    if int(windows.max()) >= vocab or int(windows.min()) < 0:
        raise InputError(f"calibration token ids fall outside the model's vocabulary of {vocab}",
                         "tokenize the calibration text with this model's tokenizer")
    return windows.long()


def _check_sources(sources: list[int] | None, num_layers: int) -> list[int]:
    if sources is None:
        return list(range(num_layers))
    if len(sources) != num_layers:
        raise InputError(f"layer_sources has {len(sources)} entries but the model has {num_layers} layers",
                         "pass one dense-model index per current layer (from the pruning manifest)")
    return [int(s) for s in sources]


def _resolve_start(
    start: int | str, previous: SensitivityProfile | None, digest: str,
    sources: list[int], fingerprints: list[str],
) -> int:
    """The first layer to measure again; ``"auto"`` = the first layer that differs from ``previous``."""
    if start == "auto":
        if previous is None or previous.calibration.digest != digest:
            return 0
        for index, (source, fingerprint) in enumerate(zip(sources, fingerprints)):
            if index >= len(previous.layers) or previous.layers[index].fingerprint != fingerprint \
                    or previous.layers[index].source != source:
                return index
        return len(sources) - 1  # nothing changed: the last layer's output is still needed
    if not isinstance(start, int) or isinstance(start, bool):
        raise InputError(f"start_layer={start!r} is not a layer index", "pass an int or 'auto'")
    if start == 0:
        return 0
    if previous is None:
        raise InputError(f"start_layer={start} needs the previous profile",
                         "pass previous=... or start_layer=0")
    limit = min(len(sources) - 1, len(previous.layers))
    if not 0 < start <= limit:
        raise InputError(f"start_layer={start} is out of range", f"use 0..{limit} or 'auto'")
    if previous.calibration.digest != digest:
        raise InputError("the previous profile used other calibration windows",
                         "recompute from start_layer=0 or reuse the same windows")
    before = previous.layers[:start]
    if [layer.source for layer in before] != sources[:start] or \
            [layer.fingerprint for layer in before] != fingerprints[:start]:
        raise InputError(f"layers before {start} changed since the previous profile",
                         "pass the first changed layer as start_layer, or start_layer='auto'")
    return start
