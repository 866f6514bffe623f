"""Export a (pruned) model as a Hugging Face folder, and load such a folder back.

The folder holds safetensors weights, config.json, the tokenizer and ``agent_prune_manifest.json``.
When every layer has the same widths the config is plain and stock
``AutoModelForCausalLM.from_pretrained(dir)`` loads it. When widths differ per layer, config.json
also lists them (``agent_prune_layer_widths``) and points ``auto_map`` at a small modeling file
written beside the weights, so ``from_pretrained(dir, trust_remote_code=True)`` loads it; our own
:func:`load_pretrained` runs the same code from the package and needs no remote code.

Biases that bias compensation adds to o_proj/down_proj keep a stock config where the family's
config flags give the stock layer those biases (Llama's ``attention_bias``/``mlp_bias``: the
projections the flags switch on and the model lacks are written as zeros). Other families list them
per layer (``agent_prune_layer_biases``) and take the modeling file, like per-layer widths: Qwen2,
Qwen3, Mistral and Gemma 2 hard-code ``bias=False`` on down_proj (Qwen2 and Mistral on o_proj too).

The export is built from a clean config and the state dict (never ``save_pretrained`` on the
model itself: transformers refuses that for a model loaded from ``.gguf``), and written to a
temporary folder that is renamed into place.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import string
import tempfile
import types
from importlib import resources
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from agent_prune.actions.manifest import MANIFEST_FILE, Manifest, check_model_matches, parse_manifest
from agent_prune.errors import InputError
from agent_prune.models.adapters import FamilyAdapter, adapter_class_for, adapter_for
from agent_prune.models.loading import _first_line, _quiet_transformers, clean_config
from agent_prune.models.offload import is_offloaded

MODELING_FILE = "modeling_agent_prune.py"
MAX_SHARD_BYTES = 50 * 10**9  # save_pretrained's default max_shard_size ("50GB")
WIDTHS_KEY = "agent_prune_layer_widths"
BIASES_KEY = "agent_prune_layer_biases"
_TEMPLATE = "modeling_agent_prune.py.tmpl"


class ExportSummary(BaseModel):
    path: str
    heterogeneous: bool
    extra_biases: bool  # biases the family's stock layers cannot hold: the modeling file adds them
    safetensors_bytes: int
    loads_with: str


def stock_class(config) -> type:
    """The stock transformers ``*ForCausalLM`` class for ``config``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def render_modeling_code(base: type, layers_path: str) -> str:
    """The self-contained modeling file for exports of ``base`` with per-layer widths."""
    template = resources.files("agent_prune.models").joinpath("templates", _TEMPLATE).read_text()
    return string.Template(template).substitute(
        base_module=base.__module__, base_class=base.__name__, class_name=f"AgentPrune{base.__name__}",
        layers_path=layers_path,
    )


@functools.cache
def pruned_class(base: type) -> type:
    """``base`` rebuilt with per-layer widths: the very code an export carries, run from the package."""
    layers_path = adapter_class_for(base.config_class.model_type).layers_path
    module = types.ModuleType(f"agent_prune_generated_{base.__name__}")
    exec(compile(render_modeling_code(base, layers_path), MODELING_FILE, "exec"), module.__dict__)
    return getattr(module, f"AgentPrune{base.__name__}")


def needs_modeling_code(config) -> bool:
    """Whether an export's config names per-layer widths or biases (the stock class builds neither)."""
    return hasattr(config, WIDTHS_KEY) or hasattr(config, BIASES_KEY)


def export_config(model: nn.Module, manifest: Manifest):
    """A clean config for the model as it is now: uniform widths in the standard fields, else per
    layer; biases through the family's flags, else per layer."""
    adapter = adapter_for(model)
    config = clean_config(model.config)
    widths = manifest.widths()
    config.num_hidden_layers = len(widths)
    config.head_dim = adapter.head_dim
    for attribute in (WIDTHS_KEY, BIASES_KEY, "auto_map"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    # Global fields hold the widest layer (exact when uniform; an upper bound for pre-allocation).
    config.num_attention_heads = max(w.num_heads for w in widths)
    config.num_key_value_heads = max(w.num_kv_heads for w in widths)
    config.intermediate_size = max(w.intermediate_size for w in widths)
    if len(set(widths)) > 1:
        setattr(config, WIDTHS_KEY, [w.model_dump() for w in widths])
    extra = extra_biases(adapter, config)
    if any(extra) and not switch_bias_flags(adapter, config, extra):
        setattr(config, BIASES_KEY, extra)
    if needs_modeling_code(config):
        class_name = f"AgentPrune{stock_class(config).__name__}"
        config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.{class_name}"}
    return config


def stock_biases(adapter: FamilyAdapter, config) -> set[str]:
    """The projections (names inside a layer) to which the stock decoder layer built from ``config``
    gives a bias; built on the meta device, so it costs no memory."""
    with torch.device("meta"):
        layer = type(adapter.layers()[0])(config, 0)
    return {name for name, linear in adapter.linear_modules(layer).items() if linear.bias is not None}


def extra_biases(adapter: FamilyAdapter, config) -> list[list[str]]:
    """Per layer, the projections with a bias that the stock layer built from ``config`` lacks."""
    stock = stock_biases(adapter, config)
    return [[name for name, linear in adapter.linear_modules(layer).items()
             if linear.bias is not None and name not in stock] for layer in adapter.layers()]


def switch_bias_flags(adapter: FamilyAdapter, config, extra: list[list[str]]) -> bool:
    """Switch on the family's bias flags that ``extra`` needs, if together they give the stock layer
    every bias in it; False (``config`` unchanged) otherwise."""
    names = {name for names in extra for name in names}
    flags = [flag for flag, part in adapter.bias_flags.items() if any(n.startswith(part) for n in names)]
    trial = copy.deepcopy(config)
    for flag in flags:
        setattr(trial, flag, True)
    if not flags or not names <= stock_biases(adapter, trial):
        return False
    for flag in flags:
        setattr(config, flag, True)
    return True


def with_zero_biases(state: dict[str, torch.Tensor], fresh: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` plus zeros for the biases ``fresh`` has and ``state`` lacks (Llama's flags switch on
    q/k/v or gate/up biases beside the o_proj/down_proj ones the model carries)."""
    zeros = {name: state[name.removesuffix("bias") + "weight"].new_zeros(param.shape)
             for name, param in fresh.named_parameters() if name.endswith(".bias") and name not in state}
    return state | zeros


def export_model(model: nn.Module, tokenizer, out_dir: str | Path, manifest: Manifest) -> ExportSummary:
    """Write ``model`` (shaped as ``manifest`` says), tokenizer and manifest to ``out_dir``, atomically."""
    adapter = adapter_for(model)
    check_model_matches(adapter, manifest)
    out = Path(out_dir).expanduser().resolve()
    _check_target(out)
    config = export_config(model, manifest)
    custom = needs_modeling_code(config)
    base = stock_class(config)
    cls = pruned_class(base) if custom else base
    with torch.device("meta"):
        fresh = cls(config)
    fresh.load_state_dict(with_zero_biases(model.state_dict(), fresh), strict=True, assign=True)
    fresh.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        if is_offloaded(model):
            save_offloaded(fresh, model, tmp)
        else:
            with _quiet_transformers():
                fresh.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if custom:
            (tmp / MODELING_FILE).write_text(render_modeling_code(base, adapter.layers_path))
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportSummary(
        path=str(out), heterogeneous=hasattr(config, WIDTHS_KEY), extra_biases=hasattr(config, BIASES_KEY),
        safetensors_bytes=safetensors_bytes(out),
        loads_with="AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" if custom
        else "AutoModelForCausalLM.from_pretrained(path)",
    )


def save_offloaded(fresh: nn.Module, model: nn.Module, folder: Path) -> None:
    """``fresh.save_pretrained(folder)`` for a ``fresh`` built from an offloaded ``model`` (its
    decoder layers meta): transformers writes the config and the resident tensors, then the weights
    file is written again with every layer's tensors, one layer in memory at a time. The same bytes
    as saving the model held whole (tests compare); a model that transformers would shard is refused."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_NAME

    from agent_prune.models.offload import materialized
    from agent_prune.models.streamed_safetensors import write_streamed

    state = fresh.state_dict()
    offloaded = {name: t for name, t in state.items() if t.device.type == "meta"}
    with _quiet_transformers():  # transformers drops tied duplicates from what it writes
        fresh.save_pretrained(folder, state_dict={n: t for n, t in state.items() if n not in offloaded})
    path = folder / SAFE_WEIGHTS_NAME
    with safe_open(path, framework="pt") as f:
        kept = list(f.keys())
    entries = {name: (state[name].dtype, tuple(state[name].shape)) for name in [*kept, *offloaded]}
    total = sum(torch.Size(shape).numel() * dtype.itemsize for dtype, shape in entries.values())
    if total > MAX_SHARD_BYTES:
        raise InputError(f"an offloaded export writes one weights file; this model's {total / 1e9:.0f} GB "
                         "would be sharded", "export it from a machine that holds it (agent-prune export)")
    adapter = adapter_for(model)

    def tensors():
        yield from ((name, state[name]) for name in kept)
        for index, layer in enumerate(adapter.layers()):
            prefix = adapter.layer_key_prefix(index)
            with materialized(layer):
                values = {prefix + name: t for name, t in layer.state_dict().items()}
            for name in (n for n in offloaded if n.startswith(prefix)):  # zeros: with_zero_biases
                dtype, shape = entries[name]
                yield name, values[name] if name in values else torch.zeros(shape, dtype=dtype)

    write_streamed(path, entries, {"format": "pt"}, tensors())


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise InputError(f"{out} exists and is not an agent-prune export",
                         "choose a new or empty output folder (an earlier export there is replaced)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an earlier export at ``out`` is swapped out first, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def safetensors_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"{folder} has no {MANIFEST_FILE}", "pass a folder written by agent-prune export")
    return parse_manifest(path.read_text())


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def export_class(path: str | Path) -> tuple[object, type]:
    """An export's config and the class that builds it (the packaged modeling code for per-layer
    widths or biases, else the stock class)."""
    from transformers import AutoConfig

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(path)
    return config, pruned_class(stock_class(config)) if needs_modeling_code(config) else stock_class(config)


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, **load_kwargs):
    """Load an agent-prune export (uniform or per-layer widths) -> ``(model, tokenizer)``, in eval mode.

    ``tokenizer`` is None when the export was written without one; ``load_kwargs`` go to
    ``from_pretrained`` (a device map).

    Runs the packaged copy of the export's modeling code, not the file in the folder, so no remote
    code is executed. The model is checked against the folder's manifest.
    """
    from transformers import AutoTokenizer

    manifest = read_manifest(path)
    try:
        config, cls = export_class(path)
        with _quiet_transformers():
            model = cls.from_pretrained(path, config=config, dtype=dtype, **load_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(Path(path)) else None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot load the export at {path}: {_first_line(exc)}",
                         "check that the folder is a complete agent-prune export") from None
    check_model_matches(adapter_for(model), manifest)
    return model.eval(), tokenizer
