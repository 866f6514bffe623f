"""Simple, documented action lists for baselines and benchmarks (no calibration data needed).

- :func:`tail_depth_actions`: remove the layers just before the last one. Late layers other than
  the final one are the cheapest to drop in layer-removal studies (ShortGPT, arXiv 2403.03853;
  Gromov et al., arXiv 2403.17887); the last layer is kept because it shapes the logits.
- :func:`uniform_width_actions`: the same cut in every layer: query heads within KV groups
  (rounded to whole heads, never more than the target) and MLP channels making up the rest.
"""

from __future__ import annotations

import math

from agent_prune.actions.manifest import Manifest
from agent_prune.actions.schema import PruneWidth, RemoveLayers


def tail_depth_actions(manifest: Manifest, layers: int) -> list[RemoveLayers]:
    """Remove ``layers`` layers ending just before the final one (e.g. 23-28 of 30)."""
    count = len(manifest.layers)
    return [RemoveLayers(layers=list(range(count - 1 - layers, count - 1)))]


def uniform_width_actions(manifest: Manifest, fraction: float) -> list[PruneWidth]:
    """Remove about ``fraction`` of every layer's prunable weights, the same way in each layer."""
    hidden, head_dim = manifest.base.hidden_size, manifest.base.head_dim
    actions = []
    for index, widths in enumerate(manifest.widths()):
        attention = 2 * hidden * head_dim * (widths.num_heads + widths.num_kv_heads)
        per_layer = attention + 3 * hidden * widths.intermediate_size
        target = fraction * per_layer
        head_cost = 2 * hidden * head_dim * widths.num_kv_heads  # one q head per group: q rows + o cols
        heads = min(math.floor(fraction * widths.heads_per_group + 0.5), int(target // head_cost),
                    widths.heads_per_group - 1)
        channels = round((target - heads * head_cost) / (3 * hidden))
        actions.append(PruneWidth(layer=index, heads=heads or None, mlp_channels=channels or None))
    return actions
