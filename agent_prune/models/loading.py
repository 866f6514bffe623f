"""Load a model and its tokenizer from a Hugging Face folder, a ``.gguf`` file, or a hub id.

A ``.gguf`` file is dequantised by transformers (tokenizer and chat template come from the same
file). Dequantising is slow (about 20 s for a 135M model on 2 cores), so the dense result is cached
as a plain Hugging Face folder under ``$AGENT_PRUNE_CACHE`` (default ``$XDG_CACHE_HOME/agent-prune``,
else ``~/.cache/agent-prune``) and later loads read that folder; the cache key covers the file's
path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from agent_prune.errors import InputError
from agent_prune.models.adapters import FamilyAdapter, adapter_class_for
from agent_prune.models.checks import check_gguf, check_model_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``path`` is a folder (with ``gguf_file`` inside it) or a hub id."""

    spec: str
    kind: str  # "hf_dir" | "gguf" | "hub" | "export"
    path: str
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path

    def fingerprint(self) -> str:
        """Cheap identity of the weights: changes when the file or folder content changes."""
        h = hashlib.sha256(self.kind.encode())
        if self.kind == "hub":
            h.update(self.path.encode())
            return h.hexdigest()[:16]
        root = Path(self.path)
        if self.gguf_file:
            files = [root / self.gguf_file]
        else:
            files = sorted(p for p in root.iterdir() if p.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource
    adapter: FamilyAdapter
    offload: str | None = None  # where the decoder layers live: None (the device), "cpu" or "disk"


@dataclass(frozen=True)
class OffloadRequest:
    """``--device-map auto``: keep the decoder layers off the device when the caps (``max_memory``,
    accelerate's keys; None: what is free) do not hold the model; ``folder`` is where they spill."""

    max_memory: dict[str, str] | None
    folder: Path


def resolve_model_source(spec: str) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource`, or raise a one-line :class:`InputError`."""
    path = Path(spec).expanduser()
    if path.is_file():
        if not path.name.lower().endswith(".gguf"):
            raise InputError(
                f"{spec} is a file but not a .gguf model",
                "pass a Hugging Face model folder, a .gguf file, or a hub id",
            )
        check_gguf(path)
        return ModelSource(spec, "gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            check_model_folder(path)
            kind = "export" if (path / "agent_prune_manifest.json").is_file() else "hf_dir"
            return ModelSource(spec, kind, str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_model_source(str(ggufs[0]))
        raise InputError(
            f"{spec} is a folder without config.json"
            + (f" and with {len(ggufs)} .gguf files" if ggufs else " or .gguf file"),
            "pass a Hugging Face model folder or one .gguf file",
        )
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", spec)
    raise InputError(f"model path {spec} does not exist", "check the path passed to --model")


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available", "use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise InputError(f"unknown device '{device}'", "use --device cpu or --device cuda")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cache_root() -> Path:
    """``$AGENT_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/agent-prune``, else ``~/.cache/agent-prune``."""
    if os.environ.get("AGENT_PRUNE_CACHE"):
        return Path(os.environ["AGENT_PRUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agent-prune"


def load_config(source: ModelSource):
    """Read only the config (cheap), so an unsupported family fails before weights load."""
    from transformers import AutoConfig

    try:
        if source.kind == "gguf":
            return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        return AutoConfig.from_pretrained(source.path, trust_remote_code=source.kind == "export")
    except OSError as exc:
        raise InputError(f"cannot load a model config from {source.display}: {_first_line(exc)}",
                         "check the path, or that the hub is reachable for a hub id") from None
    except (ValueError, KeyError) as exc:
        raise InputError(f"{source.display} is not a readable model: {_first_line(exc)}",
                         "pass a Hugging Face model folder or a .gguf file") from None


def load_model(spec: str, device: str = "cpu", dtype: str = "float32",
               offload: OffloadRequest | None = None) -> LoadedModel:
    """Load model + tokenizer for ``spec``; every failure is a one-line :class:`AgentPruneError`.

    With ``offload``, a model that does not fit the device under its caps comes back with its decoder
    layers offloaded (``agent_prune.models.offload``) and ``LoadedModel.offload`` saying where."""
    source = resolve_model_source(spec)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    if offload is not None and (loaded := _load_offloaded(source, torch_device, torch_dtype, offload)):
        return loaded
    if source.kind == "export":
        from agent_prune.models.export import load_pretrained

        model, tokenizer = load_pretrained(source.path, dtype=torch_dtype)
    else:
        config = load_config(source)
        adapter_class_for(config.model_type)  # fail fast on unsupported families
        folder, gguf_file = _dense_folder(source)
        model, tokenizer = _load_hf(folder, gguf_file, torch_dtype, source)
    model.to(torch_device).eval()
    tokenizer = prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, source, adapter_class_for(model.config.model_type)(model))


def _load_offloaded(source: ModelSource, device: torch.device, dtype: torch.dtype,
                    request: OffloadRequest) -> LoadedModel | None:
    """The model with its decoder layers off ``device`` (reading the checkpoint lazily), or None
    when it fits. A ``.gguf`` without its dense cache is dequantised whole first."""
    from agent_prune.models.offload import adopt_checkpoint_layers, offload_layers
    from agent_prune.models.offload_homes import LayerStore
    from agent_prune.models.placement import layer_device_map, layer_home

    if source.kind == "export":
        folder, gguf_file = source.path, None
    else:
        adapter_class_for(load_config(source).model_type)  # fail fast on unsupported families
        folder, gguf_file = _dense_folder(source)
    skeleton = _skeleton(source, folder, gguf_file, dtype)
    adapter_class = adapter_class_for(skeleton.config.model_type)
    home = layer_home(skeleton, adapter_class.layers_path, device, request.max_memory)
    if home is None:
        return None
    store = LayerStore(request.folder if home == "disk" else None)
    if gguf_file is None:
        device_map = layer_device_map(skeleton, adapter_class.layers_path, device)
        kwargs = {"device_map": device_map, "offload_folder": str(request.folder / "load")}
        if source.kind == "export":
            from agent_prune.models.export import load_pretrained

            model, tokenizer = load_pretrained(folder, dtype=dtype, **kwargs)
        else:
            model, tokenizer = _load_hf(folder, None, dtype, source, **kwargs)
        adopt_checkpoint_layers(model, store, device)
        if home == "cpu":  # every layer was read into RAM: transformers' offload files are done with
            shutil.rmtree(request.folder, ignore_errors=True)
    else:
        model, tokenizer = _load_hf(folder, gguf_file, dtype, source)
        model.to(device)
        offload_layers(model, store, device)
    model.eval()
    return LoadedModel(model, prepare_tokenizer(tokenizer), source, adapter_class(model), offload=home)


def _skeleton(source: ModelSource, folder: str, gguf_file: str | None, dtype: torch.dtype) -> nn.Module:
    """The model ``from_pretrained`` builds, on the meta device: shapes and sizes, no values."""
    from transformers import AutoConfig

    from agent_prune.models.export import export_class, stock_class

    if source.kind == "export":
        config, cls = export_class(folder)
    else:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(folder, **kwargs)
        cls = stock_class(config)
    with torch.device("meta"):
        return cls._from_config(clean_config(config), dtype=dtype)


def prepare_tokenizer(tokenizer):
    """Batching needs a pad token; causal LMs without one reuse EOS (masked out anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_hf(folder: str, gguf_file: str | None, dtype: torch.dtype, source: ModelSource,
             **load_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs, **load_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot load model from {source.display}: {_first_line(exc)}",
                         "check that the folder or file holds complete model weights") from None
    return model, tokenizer


def _dense_folder(source: ModelSource) -> tuple[str, str | None]:
    """Folder (and gguf file name) to load from; GGUF files go through the dequantised cache."""
    if source.kind != "gguf":
        return source.path, None
    target = cache_root() / "gguf" / source.fingerprint()
    if (target / "config.json").is_file():
        return str(target), None
    try:
        _write_dense_cache(source, target)
    except OSError:
        return source.path, source.gguf_file  # a read-only cache is no reason to fail
    return str(target), None


def _write_dense_cache(source: ModelSource, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        save_dense(model, tokenizer, tmp)
        (tmp / "agent_prune_source.json").write_text(json.dumps({"gguf": source.display}))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_dense(model: nn.Module, tokenizer, folder: Path) -> None:
    """Save a model as a plain HF folder, even one loaded from GGUF (which refuses save_pretrained).

    Builds a fresh model from the config with the quantization entry dropped and loads the state
    dict strictly, so what is saved is exactly the tensors in memory.
    """
    from transformers import AutoModelForCausalLM

    config = clean_config(model.config)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    with _quiet_transformers():
        fresh.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def clean_config(config):
    """A deep copy of ``config`` without GGUF quantization bookkeeping."""
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    return config


class _quiet_transformers:
    """Silence transformers' progress bars and warnings while loading (the CLI shows its own).

    GGUF dequantisation uses a plain ``tqdm``, which transformers' switch does not reach and which
    reads ``TQDM_DISABLE`` once, when tqdm is first imported: the CLI sets it before any import.
    """

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        self._accelerate = logging.getLogger("accelerate").level  # warns of what it offloaded
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("accelerate").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        logging.getLogger("accelerate").setLevel(self._accelerate)
        if self._bars:
            hf_logging.enable_progress_bar()
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
