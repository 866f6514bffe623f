"""How much of a width step each layer gives up: a global ranking of standardised channel scores.

FLAP (An et al., arXiv 2312.11983) standardises each layer's structure scores (z within the layer)
and removes the globally lowest: a layer whose weakest channels sit far below its typical channel,
in units of its own spread, gives up more than one whose channels all pull their weight, whatever
the layers' absolute scales. On the shared model this spares the layers FLAP spares (1-2, 9-11, 28-29)
and beats an even split (docs/benchmarks.md, "Width pruners").
Pure functions on plain lists; the planner reads the result as suggested per-layer shares.
"""

from __future__ import annotations

import torch


def standardised(scores: list[float]) -> torch.Tensor:
    values = torch.tensor(scores, dtype=torch.float64)
    if values.numel() < 2:
        return torch.zeros_like(values)
    return (values - values.mean()) / values.std().clamp_min(1e-12)


def global_allocation(scores: list[list[float]], count: int, caps: list[int]) -> list[int]:
    """Per layer, how many of the ``count`` globally lowest standardised scores it holds, never more
    than its cap (a capped layer's excess goes to the next-lowest channels elsewhere)."""
    ranked = sorted((float(z), layer) for layer, layer_scores in enumerate(scores)
                    for z in standardised(layer_scores))
    counts = [0] * len(scores)
    taken = 0
    for _, layer in ranked:
        if taken >= count:
            break
        if counts[layer] < caps[layer]:
            counts[layer] += 1
            taken += 1
    return counts
