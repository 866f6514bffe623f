"""Export a (pruned) llama-family model as one GGUF file that an unmodified llama.cpp loads.

Uniform widths are written as llama.cpp's ``llama`` architecture. Per-layer widths are written as
``deci`` (the architecture of the heterogeneous Nemotron-NAS models): llama.cpp reads head counts,
KV-head counts and feed-forward lengths as per-layer arrays for every architecture, but only some
graphs honour them. In the llama.cpp that llama-cpp-python 0.3.36 bundles, ``src/models/llama.cpp``
creates every layer's tensors with the global ``hparams.n_head()`` / ``n_ff()`` (layer 0's), so a
heterogeneous ``llama`` file cannot load, while ``src/models/deci.cpp`` reads ``n_head(il)``,
``n_head_kv(il)`` and ``n_ff(il)`` per layer and otherwise runs the same computation (RMSNorm, RoPE
"norm", GQA attention, SwiGLU MLP).

Weights are quantised with the ``gguf`` package. Default types: those of the input GGUF, tensor by
tensor, where the package can write them, else Q8_0. A pruned MLP width that is not a whole number
of quantisation blocks (32 channels for Q8_0/Q4_x/Q5_x) is padded up to one with zero channels
(zero gate/up rows and down_proj columns: silu(0) * 0 = 0, so the function is unchanged) and listed
in the summary; F16 for those down_proj matrices would cost far more bytes than the few zero rows.
Any other matrix whose rows are not whole blocks is written as F16 and listed. Q and K rows are
permuted the way llama.cpp's converter does (transformers' GGUF loader undoes it when reading).
The file is written beside its target and renamed into place.

Biases (bias compensation puts them on o_proj/down_proj) go out as F32 ``blk.N.attn_output.bias`` and
``blk.N.ffn_down.bias``, which llama.cpp loads as optional tensors of shape ``n_embd`` for both
``llama`` and ``deci`` and adds in both graphs. Biases of zeros are left out: they add nothing, and
llama.cpp sizes an ``attn_q.bias`` by ``n_embd``, which a q_proj that lost heads no longer matches.
transformers' GGUF loader reads no bias flags for ``llama`` and drops the biases, so a file with
biases is not said to load there.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from agent_prune.actions.manifest import Manifest, Widths, check_model_matches
from agent_prune.errors import InputError
from agent_prune.models.adapters import adapter_for
from agent_prune.models.gguf_vocab import add_tokenizer, copy_gguf_fields

Q = gguf.GGMLQuantizationType
# What gguf.quants can write (the K- and IQ-quants are read-only there).
WRITABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0)
FALLBACK = Q.Q8_0
# general.* keys the writer sets itself.
OWN_GENERAL_KEYS = ("general.architecture", "general.file_type", "general.quantization_version")


class GGUFSummary(BaseModel):
    path: str
    architecture: str
    heterogeneous: bool
    quant: str
    quant_source: str
    tokenizer: str
    gguf_bytes: int
    tensor_types: dict[str, int]
    f16_fallbacks: list[str]
    zero_padded_channels: dict[int, int]  # layer -> MLP channels added to reach whole blocks
    loads_with: str


def parse_quant(name: str) -> Q:
    """``"q8_0"`` -> ``Q8_0``; InputError for a name the gguf package cannot write."""
    quant = getattr(Q, name.upper(), None)
    if quant not in WRITABLE:
        raise InputError(f"cannot write GGUF tensors of type {name}",
                         f"use one of {', '.join(q.name for q in WRITABLE)}")
    return quant


def architecture_for(widths: list[Widths]) -> str:
    return "llama" if len(set(widths)) == 1 else "deci"


def tensor_type(shape: tuple[int, ...], wanted: Q) -> Q:
    """The type a tensor is written as: 1-D tensors stay F32; rows that are not whole blocks go F16."""
    if len(shape) == 1:
        return Q.F32
    block_size = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block_size == 0 else Q.F16


def block_width(width: int, kind: Q) -> int:
    """``width`` rounded up to whole quantisation blocks of ``kind`` (F32/F16 blocks are 1)."""
    block = gguf.GGML_QUANT_SIZES[kind][0]
    return -(-width // block) * block


def pad_mlp(hf_name: str, data: np.ndarray, width: int) -> np.ndarray:
    """gate/up rows or down_proj columns padded with zeros to ``width`` MLP channels."""
    if hf_name.endswith("mlp.down_proj.weight"):
        return np.pad(data, ((0, 0), (0, width - data.shape[1])))
    if hf_name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        return np.pad(data, ((0, width - data.shape[0]), (0, 0)))
    return data


def permute_rows(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's order: per head, the two rotary halves are interleaved."""
    heads = weight.shape[0] // head_dim
    return (weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def reference_types(reader: gguf.GGUFReader | None, manifest: Manifest) -> dict[str, Q]:
    """Per output tensor name, the input GGUF's type for the same tensor (layers by original index)."""
    if reader is None:
        return {}
    by_name = {t.name: t.tensor_type for t in reader.tensors}
    out = {}
    for name, kind in by_name.items():
        if not name.startswith("blk."):
            out[name] = kind
    for index, record in enumerate(manifest.layers):
        prefix = f"blk.{record.source}."
        for name, kind in by_name.items():
            if name.startswith(prefix):
                out[f"blk.{index}." + name.removeprefix(prefix)] = kind
    return out


def main_type(types: dict[str, Q]) -> Q | None:
    """The commonest matrix type of the input file (what its file type names)."""
    matrices = Counter(kind for kind in types.values() if kind not in (Q.F32,))
    return matrices.most_common(1)[0][0] if matrices else None


def export_gguf(model: nn.Module, tokenizer, out_file: str | Path, manifest: Manifest,
                quant: str | None = None, reference: str | Path | None = None) -> GGUFSummary:
    """Write ``model`` (shaped as ``manifest`` says) as a GGUF file, atomically.

    ``quant`` names one type for every matrix; None keeps the types of ``reference`` (the input
    GGUF, whose tokenizer metadata is copied too) where writable, else Q8_0.
    """
    adapter = adapter_for(model)
    check_model_matches(adapter, manifest)
    config = model.config
    check_supported(config)
    out = Path(out_file).expanduser().resolve()
    if out.suffix.lower() != ".gguf" or out.is_dir():
        raise InputError(f"{out_file} is not a .gguf file name", "pass --out NAME.gguf")
    reader = gguf.GGUFReader(str(reference)) if reference is not None else None
    given = parse_quant(quant) if quant else None
    per_tensor = reference_types(reader, manifest) if given is None else {}
    # Explicit None tests throughout: Q.F32 is 0, so `or` would skip it.
    default = _first(given, _writable(main_type(per_tensor)), FALLBACK)
    widths = manifest.widths()
    arch = architecture_for(widths)
    # Per layer, the MLP width written: whole quantisation blocks of its down_proj's type.
    ffn = [block_width(w.intermediate_size, _first(_writable(per_tensor.get(f"blk.{i}.ffn_down.weight")),
                                                   default)) for i, w in enumerate(widths)]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{out.name}-", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_metadata(writer, config, widths, ffn, adapter.head_dim, reader, manifest, default)
        vocab_size = model.get_input_embeddings().weight.shape[0]
        tokenizer_note = add_tokenizer(writer, tokenizer, vocab_size, reader)
        types, fallbacks = _add_tensors(writer, model, arch, ffn, adapter.head_dim, default, per_tensor)
        biases = any(name.endswith(".bias") for name in types)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if given is not None:
        source = "--quant"
    elif _writable(main_type(per_tensor)) is not None:
        source = "the input GGUF's types, tensor by tensor"
    else:
        source = "Q8_0: no input GGUF type the gguf package can write"
    return GGUFSummary(
        path=str(out), architecture=arch, heterogeneous=arch == "deci", quant=default.name,
        quant_source=source, tokenizer=tokenizer_note, gguf_bytes=out.stat().st_size,
        tensor_types=dict(Counter(kind.name for kind in types.values())), f16_fallbacks=fallbacks,
        zero_padded_channels={i: f - w.intermediate_size for i, (f, w) in enumerate(zip(ffn, widths))
                              if f > w.intermediate_size},
        loads_with="llama.cpp (llama_cpp.Llama(model_path=path))" + (
            "" if arch == "deci" or biases else "; transformers: from_pretrained(folder, gguf_file=name)"),
    )


def _writable(kind: Q | None) -> Q | None:
    return kind if kind in WRITABLE else None


def _first(*kinds: Q | None) -> Q:
    return next(kind for kind in kinds if kind is not None)


def check_supported(config) -> None:
    if config.model_type != "llama":
        raise InputError(f"GGUF export supports llama-family models, not {config.model_type}",
                         "export with --format hf")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"GGUF export does not write rope scaling '{rope.get('rope_type')}'",
                         "export with --format hf")


def _add_metadata(writer: gguf.GGUFWriter, config, widths: list[Widths], ffn: list[int], head_dim: int,
                  reader: gguf.GGUFReader | None, manifest: Manifest, main: Q) -> None:
    if reader is not None:
        # The writer sets the architecture itself, and the file type below: copying them would
        # overwrite (and log a "Duplicated key" warning for) the writer's own.
        copy_gguf_fields(writer, reader, "general.", skip=OWN_GENERAL_KEYS)
    rope = getattr(config, "rope_parameters", None) or {}

    def per_layer(values: list[int]) -> int | list[int]:
        # A scalar when every layer agrees: what converters write and every reader accepts.
        return values[0] if len(set(values)) == 1 else values

    writer.add_block_count(len(widths))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(per_layer(ffn))
    writer.add_head_count(per_layer([w.num_heads for w in widths]))
    writer.add_head_count_kv(per_layer([w.num_kv_heads for w in widths]))
    # Explicit, since llama.cpp would otherwise derive it as hidden / heads (wrong once heads go).
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(main))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # Provenance: which original layers, heads and channels survive (llama.cpp ignores the key).
    writer.add_string("agent_prune.manifest", manifest.to_json())


def _file_type(main: Q) -> int:
    name = "ALL_F32" if main == Q.F32 else f"MOSTLY_{main.name}"
    return int(gguf.LlamaFileType[name])


def _add_tensors(writer: gguf.GGUFWriter, model: nn.Module, arch: str, ffn: list[int], head_dim: int,
                 default: Q, per_tensor: dict[str, Q]) -> tuple[dict[str, Q], list[str]]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(ffn))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    types, fallbacks = {}, []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hf_name.endswith(".bias") and not bool(tensor.any()):
            continue  # zeros add nothing (see the module notes)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"no GGUF name for tensor {hf_name}", "export with --format hf")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = permute_rows(data, head_dim)
        layer = re.search(r"layers\.(\d+)\.mlp\.", hf_name)
        if layer is not None:
            data = pad_mlp(hf_name, data, ffn[int(layer.group(1))])
        wanted = _first(_writable(per_tensor.get(name)), default)
        kind = tensor_type(data.shape, wanted)
        if kind != wanted and kind == Q.F16:
            fallbacks.append(name)
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        types[name] = kind
    return types, fallbacks
