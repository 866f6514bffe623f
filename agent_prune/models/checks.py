"""Cheap integrity checks of model files, run before anything is loaded or written.

A truncated download or a hand-edited file otherwise fails deep inside gguf, safetensors or
transformers with an exception that names neither the file nor the fix. These checks read only
headers (a few MB at most) and compare the sizes they declare with the files on disk.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

from agent_prune.errors import InputError

# GGUF metadata (the tokenizer's vocabulary and merges included) is a few MB even for large models
HEADER_LIMIT = 64 << 20
REDOWNLOAD = "the file is truncated or corrupt; download or copy it again"

# GGUF metadata value types (gguf.constants.GGUFValueType) with a fixed size, by struct code
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Truncated(Exception):
    """A header that claims more bytes than the file holds."""


class _Reader:
    """Little-endian reads from a header buffer; running past its end means the file is truncated."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def unpack(self, code: str):
        size = struct.calcsize("<" + code)
        if self.pos + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from("<" + code, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        if self.pos + length > len(self.data):
            raise _Truncated
        text = self.data[self.pos : self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, kind: int):
        if kind in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            item_kind, count = self.unpack("I"), self.unpack("Q")
            return [self.value(item_kind) for _ in range(count)]
        raise ValueError(f"unknown metadata type {kind}")


@functools.lru_cache(maxsize=8)
def _check_gguf_once(path: Path, size: int, mtime_ns: int) -> None:
    """``check_gguf`` for one version of a file (parsing a large header takes a fraction of a second)."""
    _check_gguf(path, size)


def check_gguf(path: Path) -> None:
    """The header parses and every tensor's data lies inside the file."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", "check the path passed to --model") from None
    _check_gguf_once(path.resolve(), stat.st_size, stat.st_mtime_ns)


def _check_gguf(path: Path, size: int) -> None:
    try:
        with path.open("rb") as fh:
            header = fh.read(HEADER_LIMIT)
        if header[:4] != b"GGUF":
            raise InputError(f"{path} is not a GGUF file (bad magic bytes)", "pass a valid .gguf model file")
        needed = _gguf_size(_Reader(header))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", "check the file's permissions") from None
    except (_Truncated, ValueError, KeyError):
        raise InputError(f"{path} is not a complete GGUF file (its header is cut short or corrupt)",
                         REDOWNLOAD) from None
    if size < needed:
        raise InputError(f"{path} is truncated: {size:,} bytes of the {needed:,} its header describes",
                         REDOWNLOAD)


def _gguf_size(reader: _Reader) -> int:
    """Bytes the file must hold: the aligned data section's start plus its furthest tensor's end."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    reader.pos = 4  # past the magic bytes
    reader.unpack("I")  # version
    tensors, fields = reader.unpack("Q"), reader.unpack("Q")
    alignment = 32
    for _ in range(fields):
        key = reader.string()
        value = reader.value(reader.unpack("I"))
        if key == "general.alignment":
            alignment = int(value)
    end = 0
    for _ in range(tensors):
        reader.string()
        dims = [reader.unpack("Q") for _ in range(reader.unpack("I"))]
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(reader.unpack("I"))]
        count = 1
        for dim in dims:
            count *= dim
        end = max(end, reader.unpack("Q") + count // block * type_size)
    start = -(-reader.pos // alignment) * alignment
    return start + end


def check_model_folder(folder: Path) -> None:
    """Every JSON file parses and every safetensors file holds the bytes its header declares."""
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise InputError(f"{path} is not valid JSON{where}",
                             "restore the file from the model's source, or save the model again") from None
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size:
                raise _Truncated
            header = json.loads(fh.read(length))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                  default=0)
    except (struct.error, _Truncated, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            IndexError, AttributeError):
        raise InputError(f"{path} is not a complete safetensors file (its header is cut short or "
                         "corrupt)", REDOWNLOAD) from None
    needed = 8 + length + end
    if size < needed:
        raise InputError(f"{path} is truncated: {size:,} bytes of the {needed:,} its header describes",
                         REDOWNLOAD)
