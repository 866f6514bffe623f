"""Pruning actions as data: what the planner proposes, the CLI reads and the manifest records.

Every action names layers by the model's CURRENT numbering at the moment it applies (after earlier
actions in the same list). Amounts are either an int count or a float fraction in [0, 1) of what the
layer has at that moment. Which heads/channels/weights go is chosen later from importance scores
(``agent_prune.actions.selection``); an action never names individual channels.

A later action kind (``heal``, by the recovery code) joins :data:`Action` by adding its class to
``ACTION_TYPES`` and a handler to ``agent_prune.actions.apply.HANDLERS``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from agent_prune.errors import InvalidActionError

# An amount to remove: a count (int >= 0) or a fraction of the current width in [0, 1).
Amount = Union[int, float]  # noqa: UP007 - pydantic's smart union keeps 1 an int and 0.5 a float


def _check_amount(value: Amount | None) -> Amount | None:
    if value is None:
        return None
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"count {value} is negative")
        return value
    if not 0.0 <= value < 1.0:
        raise ValueError(f"fraction {value} is outside [0, 1) (use an int for a count)")
    return value


class _ActionBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    force: bool = Field(False, description="allow removing protected (super-weight) structures")


class RemoveLayers(_ActionBase):
    """Depth pruning: remove whole decoder layers (the residual stream bypasses them)."""

    kind: Literal["remove_layers"] = "remove_layers"
    layers: list[int] = Field(min_length=1, description="current indices of the layers to remove")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers {layers} name a layer twice")
        return layers


class PruneWidth(_ActionBase):
    """Width pruning of one layer: whole KV groups, query heads within groups, MLP channels.

    ``kv_groups`` removes whole KV groups together with their query heads; ``heads`` removes that
    many query heads from EVERY remaining KV group (so the GQA ratio stays uniform); ``mlp_channels``
    removes intermediate channels (gate/up rows with their down_proj columns). head_dim never changes,
    so RoPE and Qwen3's q_norm/k_norm stay valid.
    """

    kind: Literal["prune_width"] = "prune_width"
    layer: int = Field(description="current index of the layer")
    kv_groups: Amount | None = Field(None, description="KV groups to remove: count, or fraction of groups")
    heads: Amount | None = Field(
        None, description="query heads to remove per KV group: count, or fraction of heads per group"
    )
    mlp_channels: Amount | None = Field(None, description="MLP channels to remove: count, or fraction")

    @field_validator("kv_groups", "heads", "mlp_channels", mode="before")
    @classmethod
    def _not_boolean(cls, value):
        if isinstance(value, bool):
            raise ValueError("must be an int count or a float fraction, not a boolean")
        return value

    @field_validator("kv_groups", "heads", "mlp_channels")
    @classmethod
    def _amount_range(cls, value: Amount | None) -> Amount | None:
        return _check_amount(value)


MaskPattern = Literal["unstructured", "2:4", "4:8"]


class MaskSparsity(_ActionBase):
    """Wanda-style masking of one layer's linear weights (Sun et al. 2023, arXiv 2306.11695).

    Zeroes the lowest-scoring weights of each output row (score |W| * ||X||, or |W| without
    activation norms). It makes no tensor smaller: NO size or speed change on dense kernels.
    ``ratio`` is the fraction of each row to zero (unstructured); N:M patterns fix it at 1 - N/M.
    """

    kind: Literal["mask_sparsity"] = "mask_sparsity"
    layer: int = Field(description="current index of the layer")
    ratio: float | None = Field(None, description="fraction of weights zeroed per row, in (0, 1)")
    pattern: MaskPattern = "unstructured"

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, ratio: float | None) -> float | None:
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio {ratio} is outside (0, 1)")
        return ratio

    @model_validator(mode="after")
    def _ratio_fits_pattern(self) -> MaskSparsity:
        if self.pattern == "unstructured" and self.ratio is None:
            raise ValueError("an unstructured mask needs a ratio in (0, 1)")
        if self.pattern != "unstructured" and self.ratio is not None and self.ratio != self.nm_ratio:
            raise ValueError(f"pattern {self.pattern} zeroes exactly {self.nm_ratio} of each row, "
                             f"not {self.ratio}")
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def nm_ratio(self) -> float:
        n, m = self.n_m or (0, 1)
        return 1.0 - n / m

    @property
    def effective_ratio(self) -> float:
        return self.ratio if self.pattern == "unstructured" else self.nm_ratio


ACTION_TYPES = (RemoveLayers, PruneWidth, MaskSparsity)
Action = Annotated[Union[RemoveLayers, PruneWidth, MaskSparsity], Field(discriminator="kind")]  # noqa: UP007
_ACTION_LIST = TypeAdapter(list[Action])


def parse_actions(source: str | Sequence | dict) -> list[Action]:
    """Validate actions from JSON text, a list of dicts/actions, or one dict; one-line errors."""
    if isinstance(source, str):
        try:
            source = json.loads(source)
        except json.JSONDecodeError as exc:
            raise InvalidActionError(f"actions are not valid JSON: {exc.msg} at line {exc.lineno}",
                                     'pass a JSON list such as [{"kind": "remove_layers", "layers": [12]}]'
                                     ) from None
    if isinstance(source, (dict, BaseModel)):
        source = [source]
    items = [a.model_dump() if isinstance(a, BaseModel) else a for a in source]
    try:
        return _ACTION_LIST.validate_python(items)
    except ValidationError as exc:
        raise InvalidActionError(f"invalid action: {_first_error(exc)}",
                                 "see the action schema in the README (kinds: remove_layers, "
                                 "prune_width, mask_sparsity)") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def describe(action: Action) -> str:
    """Short human description, e.g. ``prune_width(layer=3, mlp_channels=0.25)``."""
    fields = action.model_dump(exclude={"kind"}, exclude_defaults=True)
    return f"{action.kind}({', '.join(f'{k}={v}' for k, v in fields.items())})"
