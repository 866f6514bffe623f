"""Where offloaded decoder layers keep their values (``agent_prune.models.offload``): homes that
never change once made (a safetensors file, a layer of the checkpoint the model came from, host
memory) and the store that makes new ones for changed layers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class Home:
    """One layer's tensors off the work device (never changed once made; copies share it)."""

    def load(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors on ``device``, free to change in place: the home keeps its values (a file is
        mapped copy-on-write on the CPU, which costs no copy; a forward reads it straight from the
        page cache)."""
        raise NotImplementedError

    def __deepcopy__(self, memo) -> Home:
        return self


class MemoryHome(Home):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def load(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: t.to(device, copy=True) for name, t in self.tensors.items()}


class FileHome(Home):
    """A safetensors file of the spill folder, deleted with the last layer that refers to it."""

    def __init__(self, path: Path):
        self.path = path
        weakref.finalize(self, _unlink, path)

    def load(self, device: torch.device) -> dict[str, torch.Tensor]:
        return load_file(self.path, device=str(device))


class CheckpointHome(Home):
    """A layer of the safetensors checkpoint the model was loaded from: per tensor name, the file,
    the tensor's name in it and the dtype it loads as (from transformers' offload index)."""

    def __init__(self, tensors: dict[str, tuple[str, str, torch.dtype | None]]):
        self.tensors = tensors

    def load(self, device: torch.device) -> dict[str, torch.Tensor]:
        out = {}
        for path in {path for path, _, _ in self.tensors.values()}:  # each file opened once
            with safe_open(path, framework="pt", device=str(device)) as f:
                for name, (file, key, dtype) in self.tensors.items():
                    if file == path:
                        out[name] = f.get_tensor(key) if dtype is None else f.get_tensor(key).to(dtype)
        return out


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


class LayerStore:
    """Where changed layers get their homes: safetensors files in ``folder``, else host memory.

    The folder (and its parent, once empty) is removed with the store, at the latest when the
    process exits."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._names = itertools.count()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            weakref.finalize(self, _remove, folder)

    def save(self, tensors: dict[str, torch.Tensor]) -> Home:
        cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        if self.folder is None:
            return MemoryHome(cpu)
        path = self.folder / f"{next(self._names):08d}.safetensors"
        save_file(cpu, path)
        return FileHome(path)

    def __deepcopy__(self, memo) -> LayerStore:
        return self


def spill_folder(root: Path) -> Path:
    """This process's spill folder under ``root`` (``RUN_DIR/offload``); folders of processes that
    are gone (a crashed run, before its resume) are removed."""
    if root.is_dir():
        for stale in root.iterdir():
            if stale.name.isdigit() and not _alive(int(stale.name)):
                shutil.rmtree(stale, ignore_errors=True)
    return root / str(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
