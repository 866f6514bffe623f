"""Super weights (Yu et al., "The Super Weight in Large Language Models", arXiv 2411.07191).

A super weight is a single ``down_proj`` entry ``W[row, column]`` that produces a *super
activation*: a spike in output channel ``row`` orders of magnitude above the other channels,
traced back to the input channel ``column`` whose product ``a_column * W[row, column]`` carried
it. The collectors record, per layer and output channel, the peak ``|y|`` and that contributor;
here the spikes become records and protections: the MLP channel ``column`` of that layer and the
layer itself must not be removed unless an action is explicitly forced.
"""

from __future__ import annotations

from agent_prune.sensitivity.collectors import SpikeCandidate
from agent_prune.sensitivity.schema import ProtectedItem, SuperWeight

# A super activation stands SPIKE_RATIO times above the layer's median channel peak and is large
# in absolute terms (SPIKE_MIN); see the module docstring of bench/profile_cost.py for what the
# shared model shows.
SPIKE_RATIO = 50.0
SPIKE_MIN = 20.0
DOWN_PROJ = "mlp.down_proj"


def super_weights(spikes: dict[int, list[SpikeCandidate]]) -> list[SuperWeight]:
    """One record per spike candidate, ordered by layer then row."""
    records = []
    for layer in sorted(spikes):
        for s in sorted(spikes[layer], key=lambda c: c.row):
            records.append(SuperWeight(
                layer=layer, module=DOWN_PROJ, row=s.row, column=s.column, weight=s.weight,
                output_activation=s.output, input_activation=s.input, ratio=s.ratio,
                residual_in=s.residual_in, residual_out=s.residual_out,
            ))
    return records


def protect_super_weights(records: list[SuperWeight]) -> list[ProtectedItem]:
    """The MLP channel carrying each super weight, and its layer; one item per (layer, kind, index)."""
    items: dict[tuple[int, str, int], ProtectedItem] = {}
    for sw in records:
        where = f"{sw.module}[{sw.row}, {sw.column}]"
        reason = f"super weight {where} (peak |activation| {sw.output_activation:.1f})"
        for kind, index in (("mlp_channel", sw.column), ("layer", sw.layer)):
            key = (sw.layer, kind, index)
            if key not in items or items[key].value < sw.output_activation:
                items[key] = ProtectedItem(layer=sw.layer, kind=kind, index=index, reason=reason,
                                           value=sw.output_activation)
    return sorted(items.values(), key=lambda item: (item.layer, item.kind, item.index))
