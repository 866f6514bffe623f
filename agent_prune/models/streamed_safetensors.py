"""A safetensors file written one tensor at a time: the header first (names, dtypes, shapes), then
each tensor's bytes at its offset as the caller produces it, so a model whose decoder layers are
offloaded is saved with one layer in memory. The file is byte for byte what
``safetensors.torch.save_file`` writes for the same tensors (tests compare the two).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}


@functools.cache
def _dtype_rank(dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, int]:
    """The order in which safetensors lays out these dtypes (it sorts by dtype, then by name),
    read off a file it writes with one element of each."""
    from safetensors.torch import save

    data = save({str(i): torch.zeros(1, dtype=dtype) for i, dtype in enumerate(dtypes)})
    (length,) = struct.unpack("<Q", data[:8])
    order = [key for key in json.loads(data[8 : 8 + length]) if key != "__metadata__"]
    return {dtypes[int(key)]: rank for rank, key in enumerate(order)}


def header(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None
           ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included) and each tensor's byte range in the data."""
    rank = _dtype_rank(tuple(sorted({dtype for dtype, _ in entries.values()}, key=str)))
    layout: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets, start = {}, 0
    for name in sorted(entries, key=lambda n: (rank[entries[n][0]], n)):
        dtype, shape = entries[name]
        end = start + torch.Size(shape).numel() * dtype.itemsize
        layout[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [start, end]}
        offsets[name], start = (start, end), end
    text = json.dumps(layout, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def write_streamed(path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   metadata: dict[str, str] | None, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write ``path`` from ``tensors`` (each entry exactly once, in any order)."""
    head, offsets = header(entries, metadata)
    written = set()
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + max((end for _, end in offsets.values()), default=0))
        for name, tensor in tensors:
            if name not in offsets or name in written:
                raise ValueError(f"tensor {name} is not expected here, or came twice")
            if tensor.dtype != entries[name][0] or tuple(tensor.shape) != tuple(entries[name][1]):
                raise ValueError(f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, the header says "
                                 f"{entries[name][0]} {tuple(entries[name][1])}")
            f.seek(len(head) + offsets[name][0])
            f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            written.add(name)
    if missing := set(offsets) - written:
        raise ValueError(f"tensors {sorted(missing)[:3]} were never written")
