"""Apply a list of actions to a model: plan everything first, then cut.

Planning runs every action against the manifest only (pure: validation and the choice of what to
cut, from scores keyed by original indices). Only when the whole list is valid does execution
touch the model, so an invalid action never leaves the model half-pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from agent_prune.actions.context import ApplyContext, norms_by_origin
from agent_prune.actions.manifest import AppliedAction, Manifest, check_model_matches
from agent_prune.actions.masking import execute_mask, plan_mask
from agent_prune.actions.schema import Action, parse_actions
from agent_prune.actions.selection import protected_by_origin, scores_by_origin
from agent_prune.actions.structural import execute_structural, plan_prune_width, plan_remove_layers
from agent_prune.errors import InvalidActionError
from agent_prune.models.adapters import adapter_for


@dataclass(frozen=True)
class ActionHandler:
    plan: Callable[[Action, Manifest, ApplyContext], Manifest]
    execute: Callable[[Action, Manifest, Manifest, ApplyContext], AppliedAction]


# One handler per action kind; a new kind (e.g. "heal") registers here.
HANDLERS: dict[str, ActionHandler] = {
    "remove_layers": ActionHandler(plan_remove_layers, execute_structural),
    "prune_width": ActionHandler(plan_prune_width, execute_structural),
    "mask_sparsity": ActionHandler(plan_mask, execute_mask),
}


def apply_actions(
    model: nn.Module,
    actions: Sequence[Action] | str,
    manifest: Manifest,
    scores: Mapping | Sequence | None = None,
    protected: Iterable[Mapping] = (),
    input_norms: Mapping | None = None,
) -> Manifest:
    """Apply ``actions`` to ``model`` in place; return the new manifest (``manifest`` is not changed).

    ``manifest`` must describe ``model`` as it is (``dense_manifest(model)`` for an unpruned one).
    ``scores``: per current layer ``{"kv_groups": [...], "heads": [...], "mlp_channels": [...]}``
    (higher = more important), missing kinds fall back to weight magnitudes; ``protected``:
    ``[{layer, kind, index}]`` in current indices; ``input_norms``: per current layer
    ``{"mlp.down_proj": [||X_j||, ...]}`` for Wanda mask scores. Raises InvalidActionError, with the
    model untouched, if any action is invalid.
    """
    actions = parse_actions(actions if isinstance(actions, str) else list(actions))
    adapter = adapter_for(model)
    check_model_matches(adapter, manifest)
    ctx = ApplyContext(
        adapter=adapter, start=manifest, given_scores=scores_by_origin(manifest, scores),
        protected=protected_by_origin(manifest, protected),
        input_norms=norms_by_origin(adapter, manifest, input_norms),
    )
    states = [manifest]
    for action in actions:
        states.append(_handler(action).plan(action, states[-1], ctx))
    applied = [
        _handler(action).execute(action, before, after, ctx)
        for action, before, after in zip(actions, states, states[1:])
    ]
    final = states[-1]
    return final.model_copy(update={"actions": final.actions[: len(final.actions) - len(applied)] + applied})


def _handler(action: Action) -> ActionHandler:
    if action.kind not in HANDLERS:
        raise InvalidActionError(f"action kind '{action.kind}' cannot be applied to a model here",
                                 f"apply_actions handles {', '.join(HANDLERS)}")
    return HANDLERS[action.kind]
