"""A deterministic example context shaped like the shared model (SmolLM2-135M: 30 layers, 9/3 heads,
MLP 1536), for measuring prompt sizes, documenting the prompts and exercising planners in tests.

The z-scores are synthetic (a seeded pattern with vital first/last layers), not a measured profile.
"""

from __future__ import annotations

import random

from agent_prune.agent.proposal import LayerRow, PlannerContext, StepRecord

METRICS = ("block_influence", "angular_distance", "wanda", "wanda_p10", "gradient", "taylor")
SMOLLM2_LAYER_PARAMS = 3_538_944  # q/o 576x576, k/v 576x192, gate/up/down 576x1536


def example_context(num_layers: int = 30, seed: int = 0, history: int = 2,
                    protected: tuple[int, ...] = (0,)) -> PlannerContext:
    rng = random.Random(seed)
    rows = []
    for i in range(num_layers):
        edge = 2.0 if i in (0, num_layers - 1) else 0.0
        z = {m: round(edge + rng.gauss(0.0, 0.8), 3) for m in METRICS}
        rows.append(LayerRow(index=i, source=i, params=SMOLLM2_LAYER_PARAMS, heads=9, kv_heads=3,
                             mlp_channels=1536, protected=i in protected, z=z))
    total = SMOLLM2_LAYER_PARAMS * num_layers
    steps = [StepRecord(iteration=k + 1, branch="depth", summary=f"removed layer {20 - k}",
                        sparsity=round((k + 1) / num_layers, 4), perplexity=29.5 + 2.0 * k,
                        probe_accuracy=0.36)
             for k in range(history)]
    return PlannerContext(
        iteration=history + 1, num_layers=num_layers, current_sparsity=history / num_layers,
        target_sparsity=0.25, step_budget_params=SMOLLM2_LAYER_PARAMS,
        step_budget_fraction=SMOLLM2_LAYER_PARAMS / total, layers=rows, history=steps,
        reflections=["Removing layer 3 raised perplexity by 40%; early layers are fragile."],
        rejected_layers=[3], hidden_size=576, head_dim=64,
    )
