"""Decoder layers kept off the work device, brought onto it one at a time (``--device-map auto``).

An offloaded layer holds meta tensors of its real shapes, so everything that reads only shapes
(widths, parameter counts, manifests, surgery plans) works on it unchanged; its values live in a
*home* (``offload_homes``): the checkpoint the model was loaded from, a safetensors file under the
run's spill folder, or host memory (work on a GPU, layers in RAM). :func:`materialized` puts one
layer's values on the work device for as long as a block runs, and with ``write=True`` saves what
the block changed as the layer's new home. Forward hooks do the same around every forward pass of
the layer, so the evaluation code runs an offloaded model as it is, holding one decoder layer's
weights at a time.

Homes never change once written: a copy of an offloaded model (``copy.deepcopy``, replay) shares its
layers' homes and a changed layer gets a new one (copy on write); a file goes when no layer refers to
it any more. Modules outside the decoder layers (embeddings, final norm, lm_head) stay on the work
device, and copies share them (:func:`shared_memo`): nothing a run does with an offloaded model
writes them (distillation, which would, is refused with offloaded layers).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from agent_prune.models.adapters import adapter_for
from agent_prune.models.offload_homes import CheckpointHome, Home, LayerStore

SLOT = "_agent_prune_offload"  # the attribute an offloaded layer carries its Slot in


@dataclass(eq=False)
class Slot:
    """An offloaded layer's home, its store and work device, and how deep it is materialised."""

    home: Home
    store: LayerStore
    device: torch.device
    depth: int = 0
    dirty: bool = False

    def __deepcopy__(self, memo) -> Slot:
        if self.depth:
            raise RuntimeError("an offloaded layer was copied while materialised "
                               "(copy it outside materialized())")
        return Slot(self.home, self.store, self.device)


def slot_of(layer: nn.Module) -> Slot | None:
    return layer.__dict__.get(SLOT)


def is_offloaded(model: nn.Module) -> bool:
    """Whether any decoder layer of ``model`` lives off the work device."""
    return any(SLOT in module.__dict__ for module in model.modules())


def _names(layer: nn.Module) -> list[str]:
    return list(layer.state_dict(keep_vars=True))


def _fill(layer: nn.Module, values: dict[str, torch.Tensor], device: torch.device) -> None:
    names = _names(layer)
    if sorted(names) != sorted(values):
        raise RuntimeError(f"an offloaded layer's home holds {sorted(values)[:3]}..., "
                           f"the layer {names[:3]}...")
    for name in names:
        _set(layer, name, values[name].to(device))


def _drop(layer: nn.Module) -> None:
    for name, tensor in layer.state_dict(keep_vars=True).items():
        _set(layer, name, tensor.detach().to("meta"))


def _set(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the tensor ``name`` of ``layer`` (same shape; a parameter keeps
    its ``requires_grad``)."""
    owner, _, leaf = name.rpartition(".")
    module = layer.get_submodule(owner)
    old = module._parameters.get(leaf, module._buffers.get(leaf))
    if old.shape != value.shape:
        raise RuntimeError(f"an offloaded layer's {name} is {tuple(value.shape)} in its home, "
                           f"{tuple(old.shape)} in the layer")
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def _enter(layer: nn.Module, write: bool = False, device: torch.device | None = None) -> None:
    slot = slot_of(layer)
    if slot.depth == 0:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, even inside inference mode
            _fill(layer, slot.home.load(device or slot.device), device or slot.device)
    slot.depth += 1
    slot.dirty = slot.dirty or write


def _exit(layer: nn.Module) -> None:
    slot = slot_of(layer)
    slot.depth -= 1
    if slot.depth:
        return
    with torch.inference_mode(False), torch.no_grad():
        if slot.dirty:
            slot.home, slot.dirty = slot.store.save(layer.state_dict()), False
        _drop(layer)


@contextlib.contextmanager
def materialized(layer: nn.Module, write: bool = False, device: torch.device | None = None
                 ) -> Iterator[nn.Module]:
    """``layer`` with its values on the work device (or ``device``) inside the block; with
    ``write``, what the block changed becomes the layer's home. A no-op for a layer that is not
    offloaded; nested blocks load and save once."""
    if slot_of(layer) is None:
        yield layer
        return
    _enter(layer, write, device)
    try:
        yield layer
    finally:
        _exit(layer)


def _before_forward(layer: nn.Module, args) -> None:
    _enter(layer)


def _after_forward(layer: nn.Module, args, output) -> None:
    _exit(layer)


def _adopt(layer: nn.Module, home: Home, store: LayerStore, device: torch.device) -> None:
    _drop(layer)
    setattr(layer, SLOT, Slot(home, store, device))
    layer.register_forward_pre_hook(_before_forward)
    layer.register_forward_hook(_after_forward, always_call=True)


def offload_layers(model: nn.Module, store: LayerStore, device: torch.device) -> None:
    """Give every decoder layer of ``model`` (held whole) a home in ``store``; they run on ``device``."""
    with torch.no_grad():
        for layer in adapter_for(model).layers():
            _adopt(layer, store.save(layer.state_dict()), store, device)


def adopt_checkpoint_layers(model: nn.Module, store: LayerStore, device: torch.device) -> None:
    """Take over the decoder layers that transformers left on "disk" (``from_pretrained`` with a
    device map): each reads its values from the checkpoint (or, with a host-memory store, is read
    once into RAM); accelerate's hooks and the device map are removed."""
    from accelerate.hooks import remove_hook_from_module

    adapter = adapter_for(model)
    layers, homes = adapter.layers(), []
    for index, layer in enumerate(layers):
        found = _checkpoint_home(_offload_index(layer), adapter.layer_key_prefix(index), _names(layer))
        if isinstance(found, CheckpointHome) and store.folder is not None:
            homes.append(found)
        else:  # a host-memory store, or values transformers copied out of another format: keep them
            homes.append(store.save(found.load(torch.device("cpu")) if isinstance(found, Home) else found))
    remove_hook_from_module(model, recurse=True)
    model.__dict__.pop("hf_device_map", None)
    for layer, home in zip(layers, homes):
        _adopt(layer, home, store, device)


def _checkpoint_home(weights: Mapping[str, torch.Tensor], prefix: str, names: list[str]
                     ) -> CheckpointHome | dict[str, torch.Tensor]:
    """Where in the checkpoint a layer's tensors are, or (for offload files transformers wrote
    itself, from a checkpoint that is not safetensors) the layer's values."""
    index = getattr(weights, "index", {})
    entries = {name: index.get(prefix + name, {}) for name in names}
    if all("safetensors_file" in entry for entry in entries.values()):
        return CheckpointHome({name: (entry["safetensors_file"], entry.get("weight_name", prefix + name),
                                      getattr(torch, entry["dtype"]) if "dtype" in entry else None)
                               for name, entry in entries.items()})
    return {name: weights[prefix + name] for name in names}


def _offload_index(layer: nn.Module) -> Mapping[str, torch.Tensor]:
    """The weights loader behind the accelerate hooks of a layer transformers offloaded."""
    for module in layer.modules():
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "offload", False) and hook.weights_map is not None:
            return getattr(hook.weights_map, "dataset", hook.weights_map)
    raise RuntimeError("transformers left a decoder layer without its offload index")


def shared_memo(model: nn.Module) -> dict[int, object]:
    """A ``copy.deepcopy`` memo under which a copy of an offloaded model shares the tensors outside
    its decoder layers (empty, so nothing is shared, for a model held whole)."""
    if not is_offloaded(model):
        return {}
    tensors = itertools.chain(model.parameters(), model.buffers())
    return {id(t): t for t in tensors if t.device.type != "meta"}


def state_items(model: nn.Module, prefixes: Mapping[str, nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict().items()`` with real values: the layer each ``prefix`` names (e.g.
    ``model.layers.3.``) is materialised while its entries are read, one layer at a time."""
    state = model.state_dict()
    done: set[str] = set()
    for name, tensor in state.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None or slot_of(prefixes[prefix]) is None:
            yield name, tensor
        elif prefix not in done:
            done.add(prefix)
            with materialized(prefixes[prefix]) as layer:
                values = {prefix + key: value for key, value in layer.state_dict().items()}
            yield from ((key, values[key]) for key in state if key.startswith(prefix))
