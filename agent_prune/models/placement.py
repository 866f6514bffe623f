"""Where a run keeps decoder layers, from ``--device-map auto`` and ``--max-memory`` (accelerate's
conventions: ``cpu=300MiB``, ``0=20GiB``, sizes as ``accelerate.utils.convert_file_size_to_int``
reads them).

accelerate's ``infer_auto_device_map`` fills the work device, then the CPU, then disk. When it puts
the whole model on the work device nothing is offloaded; otherwise every decoder layer of every model
the run holds is kept off the work device (the run holds the dense model, the current step and a
candidate, so offloading only the layers a map for one model would spill does not keep within the
cap) and runs there one layer at a time: in host memory when the map stays on the CPU, else on
disk. The modules outside the layers (embeddings, final norm, lm_head) stay on the work device,
which must hold them and one layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from agent_prune.errors import InputError

SIZE_HINT = "give a size such as 300MiB, 20GiB or 2GB"


def parse_max_memory(text: str) -> dict[str, str]:
    """``"cpu=300MiB,0=20GiB"`` -> ``{"cpu": "300MiB", "0": "20GiB"}`` (checked by :func:`memory_caps`)."""
    caps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = item.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise InputError(f"--max-memory '{item}' is not DEVICE=SIZE",
                             "e.g. --max-memory cpu=300MiB,0=20GiB")
        caps[device.strip()] = size.strip()
    if not caps:
        raise InputError("--max-memory names no device", "e.g. --max-memory cpu=300MiB")
    return caps


def memory_caps(caps: dict[str, str | int]) -> dict[str | int, int]:
    """Bytes per device in accelerate's keys (``"cpu"``, ``"disk"``, GPU indices as ints)."""
    from accelerate.utils import convert_file_size_to_int

    out: dict[str | int, int] = {}
    for device, size in caps.items():
        key = int(device) if str(device).isdigit() else str(device)
        if key not in ("cpu", "disk") and not isinstance(key, int):
            raise InputError(f"unknown device '{device}' in --max-memory",
                             "name cpu, disk or a GPU index such as 0 (accelerate's max_memory keys)")
        value = int(size) if str(size).isdigit() else size
        try:
            out[key] = convert_file_size_to_int(value)
        except ValueError:
            raise InputError(f"--max-memory {device}={size}: '{size}' is not a size", SIZE_HINT) from None
        if out[key] <= 0:
            raise InputError(f"--max-memory {device}={size} is not a positive size", SIZE_HINT)
    return out


def device_key(device: torch.device) -> str | int:
    """accelerate's name for the work device: ``"cpu"`` or the GPU index."""
    return "cpu" if device.type == "cpu" else (device.index if device.index is not None else 0)


def check_caps_device(caps: dict[str | int, int], device: torch.device) -> None:
    """A GPU cap must name the run's device: a run works on one device."""
    gpus = [key for key in caps if isinstance(key, int)]
    if gpus and gpus != [device_key(device)]:
        raise InputError(f"--max-memory names GPU {', '.join(map(str, gpus))} but the run works on {device}",
                         "cap the run's device (and cpu, disk) only")


def layer_home(skeleton: nn.Module, layers_path: str, device: torch.device,
               max_memory: dict[str, str] | None) -> str | None:
    """``None`` when ``skeleton`` (a meta model) fits the work device under the caps, else where its
    decoder layers go: ``"cpu"`` (a GPU run whose map stays in RAM) or ``"disk"``."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_max_memory

    work = device_key(device)
    if max_memory:
        caps = get_max_memory(memory_caps(max_memory))
        check_caps_device(caps, device)
    else:  # what is free on the run's device and in RAM
        caps = {key: size for key, size in get_max_memory().items() if key in (work, "cpu")}
    if work not in caps:
        raise InputError(f"--max-memory gives no size for the run's device {device}",
                         f"add {work}=SIZE, or leave --max-memory out to use what is free")
    layers = skeleton.get_submodule(layers_path)
    split = [type(layers[0]).__name__]
    device_map = infer_auto_device_map(skeleton, max_memory=caps, no_split_module_classes=split)
    if all(place == work for place in device_map.values()):
        return None
    sizes = compute_module_sizes(skeleton)
    layer_bytes = [sizes[f"{layers_path}.{i}"] for i in range(len(layers))]
    need = sizes[""] - sum(layer_bytes) + max(layer_bytes)
    if caps[work] < need:
        raise InputError(f"--max-memory {work}={size_text(caps[work], math.floor)} is less than the modules "
                         f"outside the decoder layers and one layer ({size_text(need)})",
                         f"give the run's device at least {size_text(need)}")
    return "disk" if device.type == "cpu" or "disk" in device_map.values() else "cpu"


def size_text(size: int, rounding=math.ceil) -> str:
    """``size`` bytes in the largest binary unit it reaches, as --max-memory takes it (``249KiB``)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{rounding(size / scale)}{unit}"
    return str(size)


def layer_device_map(model: nn.Module, layers_path: str, device: torch.device) -> dict[str, str]:
    """A device map for ``from_pretrained``: every decoder layer on ``"disk"``, all else on ``device``."""
    out: dict[str, str] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            out[prefix + name] = str(device)
        for name, child in module.named_children():
            path = prefix + name
            if path == layers_path:
                out.update({f"{path}.{i}": "disk" for i in range(len(child))})
            elif layers_path.startswith(path + "."):
                walk(path + ".", child)
            else:
                out[path] = str(device)

    walk("", model)
    return out
