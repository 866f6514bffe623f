"""The manifest: a pruned state described as data, relative to its base model.

For each surviving layer it records the layer's ORIGINAL index and the original indices of its
surviving KV groups, query heads and MLP channels; plus the actions applied, which weights carry
masks and which were overwritten (refit by recovery). ``replay(base, manifest, tensors)`` rebuilds
the pruned model exactly from the base model and the side tensors (masks, overridden weights) that
``side_tensors(model, manifest)`` extracts. Side-tensor keys name layers by their original index
("L12.mlp.down_proj.weight"), so later depth pruning never changes them.

Index lists serialise to compact range strings ("0-511,513-1535") so manifests stay small in JSON.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)
from torch import nn

from agent_prune.actions.schema import Action
from agent_prune.errors import InputError
from agent_prune.models.accounting import prunable_parameters
from agent_prune.models.adapters import FamilyAdapter, adapter_for
from agent_prune.models.offload import is_offloaded, materialized

SCHEMA_VERSION = 1
MANIFEST_FILE = "agent_prune_manifest.json"
MASK_SUFFIX = ".mask"


def parse_ranges(value: Any) -> list[int]:
    """``"0-3,7"`` or ``[0, 1, 2, 3, 7]`` -> sorted distinct ints ``[0, 1, 2, 3, 7]``."""
    if isinstance(value, str):
        out: list[int] = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            start, _, end = part.partition("-")
            out.extend(range(int(start), int(end or start) + 1))
        value = out
    values = [int(v) for v in value]
    if values != sorted(set(values)) or any(v < 0 for v in values):
        raise ValueError("indices must be distinct, non-negative and ascending")
    return values


def format_ranges(values: list[int]) -> str:
    runs: list[str] = []
    start = prev = None
    for v in [*values, None]:
        if start is not None and (v is None or v != prev + 1):
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if start is None:
            start = v
        prev = v
    return ",".join(runs)


IndexList = Annotated[
    list[int], BeforeValidator(parse_ranges), PlainSerializer(format_ranges, when_used="json")
]


class Widths(BaseModel):
    model_config = ConfigDict(frozen=True)

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


class BaseInfo(BaseModel):
    """The model a manifest is relative to: replay checks it matches before cutting."""

    # ``model_type`` is transformers' name; pydantic < 2.10 would warn that it starts with "model_"
    model_config = ConfigDict(protected_namespaces=())

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    head_dim: int
    widths: list[Widths] = Field(description="per original layer")
    prunable_parameters: int
    fingerprint: str | None = None


class LayerRecord(BaseModel):
    """One surviving layer, in original indices."""

    source: int = Field(description="original layer index")
    kv_heads: IndexList = Field(description="original KV-group indices kept")
    heads: IndexList = Field(description="original query-head indices kept")
    mlp_channels: IndexList = Field(description="original MLP intermediate channels kept")

    def widths(self) -> Widths:
        return Widths(num_heads=len(self.heads), num_kv_heads=len(self.kv_heads),
                      intermediate_size=len(self.mlp_channels))


class AppliedAction(BaseModel):
    """An action as applied: what it named, which original layers it touched, what it removed."""

    action: Action
    layer_sources: list[int]
    removed: dict[str, int] = Field(default_factory=dict, description="counts by structure kind")
    score_sources: dict[str, str] = Field(
        default_factory=dict,
        description="per structure kind: 'profile' (given scores) or 'weight_magnitude' (fallback)",
    )
    effect: str


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    base: BaseInfo
    layers: list[LayerRecord]
    actions: list[AppliedAction] = Field(default_factory=list)
    masked: list[str] = Field(default_factory=list, description="module keys whose weight carries a mask")
    overridden: list[str] = Field(default_factory=list, description="module keys with overwritten params")

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        check_records(self.base, self.layers)
        return self

    # ---- reading -----------------------------------------------------------------------------
    def widths(self) -> list[Widths]:
        return [record.widths() for record in self.layers]

    def source_of(self, layer: int) -> int:
        return self.layers[layer].source

    @property
    def is_structural(self) -> bool:
        """True when anything was physically removed (masks and overrides do not count)."""
        return len(self.layers) != self.base.num_hidden_layers or any(
            record.widths() != self.base.widths[record.source] for record in self.layers
        )

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    # ---- side tensors ------------------------------------------------------------------------
    def mark_overridden(self, layer: int | None, module: str) -> str:
        """Record that ``module``'s parameters (weight, and bias if any) were overwritten in place.

        ``layer`` is the current layer index and ``module`` a path inside it ("mlp.down_proj"); with
        ``layer=None`` it is a path in the whole model ("model.norm"). :func:`side_tensors` then
        saves the module's values and :func:`replay` restores them exactly. Returns the module key.
        """
        key = module if layer is None else module_key(self.source_of(layer), module)
        if key not in self.overridden:
            self.overridden.append(key)
        return key

    def mark_masked(self, layer: int, module: str) -> str:
        key = module_key(self.source_of(layer), module)
        if key not in self.masked:
            self.masked.append(key)
        return key


def module_key(source: int, module: str) -> str:
    """Stable name of a module inside original layer ``source``: ``L12.mlp.down_proj``."""
    return f"L{source}.{module}"


def check_records(base: BaseInfo, layers: list[LayerRecord]) -> None:
    """Raise ValueError unless ``layers`` is a valid pruned state of ``base``."""
    sources = [r.source for r in layers]
    if not layers or sources != sorted(set(sources)) or sources[-1] >= base.num_hidden_layers:
        raise ValueError(f"layer sources {sources} must be distinct, ascending, < {base.num_hidden_layers}")
    for record in layers:
        widths = base.widths[record.source]
        where = f"layer from original {record.source}"
        if not (record.kv_heads and record.heads and record.mlp_channels):
            raise ValueError(f"{where} keeps no KV group, head or MLP channel")
        if record.kv_heads[-1] >= widths.num_kv_heads or record.heads[-1] >= widths.num_heads or (
                record.mlp_channels[-1] >= widths.intermediate_size):
            raise ValueError(f"{where} names an index beyond the base widths {widths.model_dump()}")
        groups = [h // widths.heads_per_group for h in record.heads]
        per_group = len(record.heads) // len(record.kv_heads)
        uneven = any(groups.count(g) != per_group for g in record.kv_heads)
        if sorted(set(groups)) != record.kv_heads or uneven:
            raise ValueError(f"{where}: heads {record.heads} are not spread evenly over KV groups "
                             f"{record.kv_heads}")


def parse_manifest(text: str) -> Manifest:
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise InputError(f"invalid manifest: {exc.errors()[0]['msg']}",
                         "pass a manifest written by agent-prune") from None


# ---- building ------------------------------------------------------------------------------------
def dense_manifest(model: nn.Module, fingerprint: str | None = None) -> Manifest:
    """The manifest of ``model`` as it is: every layer, head and channel kept; the base for pruning."""
    adapter = adapter_for(model)
    widths = [Widths(**vars(adapter.layer_widths(layer))) for layer in adapter.layers()]
    base = BaseInfo(
        model_type=model.config.model_type, num_hidden_layers=len(widths),
        hidden_size=adapter.hidden_size, head_dim=adapter.head_dim, widths=widths,
        prunable_parameters=prunable_parameters(adapter), fingerprint=fingerprint,
    )
    layers = [LayerRecord(source=i, kv_heads=list(range(w.num_kv_heads)), heads=list(range(w.num_heads)),
                          mlp_channels=list(range(w.intermediate_size))) for i, w in enumerate(widths)]
    return Manifest(base=base, layers=layers)


def check_model_matches(adapter: FamilyAdapter, manifest: Manifest) -> None:
    """Raise InputError unless ``adapter``'s model has exactly the manifest's current layer widths."""
    actual = [Widths(**vars(adapter.layer_widths(layer))) for layer in adapter.layers()]
    if adapter.config.model_type != manifest.base.model_type or actual != manifest.widths():
        raise InputError(
            f"the model ({adapter.config.model_type}, {len(actual)} layers) is not shaped as its "
            f"manifest describes ({manifest.base.model_type}, {len(manifest.layers)} layers, widths)",
            "pass the manifest that belongs to this model (dense_manifest(model) for an unpruned one)",
        )


def check_base_matches(base_model: nn.Module, manifest: Manifest) -> FamilyAdapter:
    adapter = adapter_for(base_model)
    widths = [Widths(**vars(adapter.layer_widths(layer))) for layer in adapter.layers()]
    info = manifest.base
    found = (base_model.config.model_type, widths, adapter.head_dim)
    if found != (info.model_type, info.widths, info.head_dim):
        raise InputError(
            f"the base model ({base_model.config.model_type}, {len(widths)} layers) is not the manifest's "
            f"base ({info.model_type}, {info.num_hidden_layers} layers)",
            "replay a manifest on the model it was made from",
        )
    return adapter


# ---- side tensors and replay ---------------------------------------------------------------------
def _resolve_module(adapter: FamilyAdapter, manifest: Manifest, key: str) -> nn.Module:
    """The module a key names in the model ``adapter`` wraps (whose layers follow ``manifest``)."""
    if not key.startswith("L"):
        return adapter.model.get_submodule(key)
    source, _, path = key[1:].partition(".")
    positions = {record.source: i for i, record in enumerate(manifest.layers)}
    if not source.isdigit() or int(source) not in positions:
        raise InputError(f"side tensor key {key} names no surviving layer", "check the manifest")
    return adapter.layers()[positions[int(source)]].get_submodule(path)


def _side_params(adapter: FamilyAdapter, manifest: Manifest, keys: set[str] | None = None):
    """``(tensor key, parameter, is_mask)`` for every side tensor of ``manifest`` in this model (of
    the module keys ``keys`` only, when given)."""
    for key in manifest.overridden:
        if keys is None or key in keys:
            for name, param in _resolve_module(adapter, manifest, key).named_parameters(recurse=False):
                yield f"{key}.{name}", param, False
    for key in manifest.masked:
        if key not in manifest.overridden and (keys is None or key in keys):  # an override holds the zeros
            yield f"{key}.weight{MASK_SUFFIX}", _resolve_module(adapter, manifest, key).weight, True


def _side_groups(adapter: FamilyAdapter, manifest: Manifest) -> list[tuple[nn.Module | None, set[str]]]:
    """The module keys with side tensors, grouped by the decoder layer that holds them (None: outside
    the layers), so an offloaded layer is brought in once for all of its keys."""
    positions = {f"L{record.source}.": i for i, record in enumerate(manifest.layers)}
    groups: dict[int | None, set[str]] = {}
    for key in [*manifest.overridden, *manifest.masked]:
        groups.setdefault(positions.get(key[: key.find(".") + 1]), set()).add(key)
    layers = adapter.layers()
    return [(None if position is None else layers[position], keys) for position, keys in groups.items()]


def _add_saved_biases(adapter: FamilyAdapter, manifest: Manifest, tensors: dict[str, torch.Tensor],
                      keys: set[str]) -> None:
    """Give each overridden linear (of ``keys``) that has a saved bias and no bias of its own a zero
    one to restore it into: bias compensation adds biases where the base model's projections have none."""
    for key in (k for k in manifest.overridden if k in keys):
        module = _resolve_module(adapter, manifest, key)
        if f"{key}.bias" in tensors and isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(module.weight.new_zeros(module.out_features),
                                       requires_grad=module.weight.requires_grad)


def side_tensors(model: nn.Module, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Tensors replay needs beyond the base model: overridden params and masks, by stable key.

    ``{"L12.mlp.down_proj.weight": values, "L3.self_attn.q_proj.weight.mask": bool keep-mask, ...}``
    (CPU, contiguous; save with safetensors).
    """
    adapter = adapter_for(model)
    values = {}
    for layer, keys in _side_groups(adapter, manifest):
        with materialized(layer) if layer is not None else contextlib.nullcontext():
            values.update({
                key: ((param.detach() != 0) if is_mask else param.detach()).to("cpu", copy=True).contiguous()
                for key, param, is_mask in _side_params(adapter, manifest, keys)
            })
    return {key: values[key] for key, _, _ in _side_params(adapter, manifest)}


def replay(base_model: nn.Module, manifest: Manifest, tensors: dict[str, torch.Tensor] | None = None
           ) -> nn.Module:
    """Rebuild the pruned model described by ``manifest`` from ``base_model`` (left untouched).

    Structure comes from the manifest; masks and overridden values from ``tensors`` (see
    :func:`side_tensors`), biases included where the base has none. The result equals the pruned
    model bit for bit.
    """
    from agent_prune.actions.surgery import restructured_copy

    check_base_matches(base_model, manifest)
    tensors = tensors or {}
    model = restructured_copy(base_model, dense_manifest(base_model).layers, manifest.layers)
    adapter = adapter_for(model)
    if missing := [key for key, _, _ in _side_params(adapter, manifest) if key not in tensors]:
        raise InputError(f"replay needs side tensors the caller did not pass: {', '.join(missing[:3])}"
                         + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                         "pass tensors=side_tensors(pruned_model, manifest) (or the checkpoint's copy)")
    for layer, keys in _side_groups(adapter, manifest):
        if layer is None and is_offloaded(model):  # the copy shares those modules with the base model
            raise InputError(f"side tensors outside the decoder layers ({sorted(keys)[0]}) cannot be "
                             "replayed onto an offloaded model", "replay it without --device-map")
        with materialized(layer, write=True) if layer is not None else contextlib.nullcontext():
            _add_saved_biases(adapter, manifest, tensors, keys)
            _restore(adapter, manifest, tensors, keys)
    return model


@torch.no_grad()
def _restore(adapter: FamilyAdapter, manifest: Manifest, tensors: dict[str, torch.Tensor], keys: set[str]
             ) -> None:
    """Copy the saved overrides and apply the saved masks of the module keys ``keys``."""
    for key, param, is_mask in _side_params(adapter, manifest, keys):  # an override brings no mask
        value = tensors[key]
        if value.shape != param.shape:
            raise InputError(f"side tensor {key} has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(param.shape)}", "pass the tensors saved with this manifest")
        if is_mask:
            param.masked_fill_(~value.to(param.device, torch.bool), 0)
        else:
            param.copy_(value.to(param.device, param.dtype))
