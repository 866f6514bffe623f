"""One decoder layer's forward statistics, gathered during whatever pass runs the layer.

The profile runs every layer once just to measure it. The reconstruction walk already runs every
refitted layer on the same calibration windows, so it can measure each layer on the way
(:class:`WalkProfile`): the loop then reads the accepted candidate's profile off its build instead
of running the model again (issue 16: the profile was a tenth of the demo's time).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from agent_prune.heap import release_memory
from agent_prune.models.adapters import FamilyAdapter, adapter_for
from agent_prune.models.streaming import WALK_BATCH_TOKENS, windows_per_batch
from agent_prune.sensitivity import metrics
from agent_prune.sensitivity.collectors import ChannelCollector, DepthCollector
from agent_prune.sensitivity.layerstats import ForwardStats, attach_collectors, forward_stats
from agent_prune.sensitivity.superweights import SPIKE_MIN, SPIKE_RATIO


class LayerMeasure:
    """The collectors of one layer, hooked from construction to :meth:`close`.

    ``observe`` takes each batch's layer input and output, in the order the batches ran. With
    ``defer_down`` down_proj is not hooked: its inputs and outputs come through :meth:`add_down`
    (a refit pass runs the layer before its down_proj changes, so the hook would see old outputs).
    With ``obs_damping`` the output projections' input Gram matrices are collected too, for OBS
    scores at that damping.
    """

    def __init__(self, adapter: FamilyAdapter, layer: nn.Module, *, defer_down: bool = False,
                 on_close: Callable[[ForwardStats], None] | None = None, spike_ratio: float = SPIKE_RATIO,
                 spike_min: float = SPIKE_MIN, obs_damping: float | None = None):
        self.adapter, self.layer = adapter, layer
        self.collectors, self.handles = attach_collectors(adapter, layer, hessian=obs_damping is not None,
                                                          hook_down=not defer_down)
        self.channels = next(c for c in self.collectors.values() if isinstance(c, ChannelCollector))
        self.depth = DepthCollector()
        self.on_close = on_close
        self.settings = (spike_ratio, spike_min, obs_damping)

    def add_down(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """down_proj's input and output for the next batch (only with ``defer_down``)."""
        self.channels.add_batch(inputs, outputs)

    def observe(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        self.depth.add_batch(x_in, x_out)
        self.channels.observe_layer(x_in, x_out)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def close(self) -> ForwardStats:
        """Unhook, read the statistics off the collectors and the layer's weights as they are now."""
        self.detach()
        stats = forward_stats(self.adapter, self.layer, self.collectors, self.depth, *self.settings)
        for collector in self.collectors.values():
            collector.free()
        release_memory()  # the scores' temporaries sit under the mmap threshold: give them back now
        if self.on_close is not None:
            self.on_close(stats)
        return stats


class WalkProfile:
    """Measures every layer of ``model`` during a reconstruction walk (pass it as ``measure``), then
    :meth:`profile` assembles the sensitivity profile a separate ``profile_model`` call would give
    on the same windows (forward metrics only; the same values up to float summation order)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, layer_sources: list[int], *,
                 hessians: bool = False, obs_damping: float = metrics.OBS_DAMPING,
                 batch_size: int | None = None, **info):
        self.model, self.windows, self.sources = model, windows, layer_sources
        self.adapter = adapter_for(model)
        # the walk's batches are the refit's (reconstruct's default), recorded in the profile
        self.batch_size = batch_size or windows_per_batch(WALK_BATCH_TOKENS, windows.shape[1])
        self.hessians, self.obs_damping = hessians, obs_damping
        self.info = info  # dataset, seed, model_name for the profile's header
        self.stats: dict[int, ForwardStats] = {}
        self.started = time.perf_counter()

    def __call__(self, index: int, layer: nn.Module, defer_down: bool) -> LayerMeasure:
        def keep(stats: ForwardStats) -> None:
            self.stats[index] = stats

        return LayerMeasure(self.adapter, layer, defer_down=defer_down, on_close=keep,
                            obs_damping=self.obs_damping if self.hessians else None)

    def profile(self):
        """The :class:`SensitivityProfile`, or None when the walk did not measure every layer (a walk
        with nothing to refit does not run)."""
        from agent_prune.sensitivity.profile import assemble_profile

        if sorted(self.stats) != list(range(self.adapter.num_layers)):
            return None
        seconds = round(time.perf_counter() - self.started, 3)
        return assemble_profile(
            self.model, self.windows, self.sources, self.stats, seconds=seconds, forward_seconds=seconds,
            device=str(next(self.model.parameters()).device), batch_size=self.batch_size,
            activation_store="none", measured_in="reconstruction", **self.info)
