"""One entry point for every command that writes a model: a Hugging Face folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn

from agent_prune.actions.manifest import Manifest
from agent_prune.errors import InputError

Format = Literal["hf", "gguf"]
FORMATS = ("hf", "gguf")


def add_format_args(parser) -> None:
    parser.add_argument("--format", choices=FORMATS, default=None, dest="export_format",
                        help="hf: safetensors folder (default); gguf: one llama.cpp file")
    parser.add_argument("--quant", default=None, dest="export_quant",
                        help="GGUF tensor type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32); "
                             "default: the input GGUF's types, else Q8_0")


def check_format(fmt: str, quant: str | None) -> None:
    if quant is not None and fmt != "gguf":
        raise InputError("--quant applies to GGUF output only", "add --format gguf")
    if quant is not None:
        from agent_prune.models.gguf_export import parse_quant

        parse_quant(quant)


def check_exportable(spec: str, fmt: str, quant: str | None) -> None:
    """Fail before a run starts when its model cannot be written in ``fmt`` at the end."""
    from agent_prune.models.loading import load_config, resolve_model_source

    check_format(fmt, quant)
    if fmt == "gguf":
        from agent_prune.models.gguf_export import check_supported

        check_supported(load_config(resolve_model_source(spec)))


def input_gguf(spec: str | None) -> Path | None:
    """The GGUF file a model spec names (its tokenizer and tensor types carry over), else None."""
    from agent_prune.models.loading import resolve_model_source

    if spec is None:
        return None
    source = resolve_model_source(spec)
    return Path(source.path) / source.gguf_file if source.kind == "gguf" else None


def write_model(model: nn.Module, tokenizer, out: str | Path, manifest: Manifest, fmt: Format = "hf",
                quant: str | None = None, reference: Path | None = None) -> dict:
    """Write ``model`` as ``fmt``; returns the export summary with ``format`` and ``bytes`` added."""
    check_format(fmt, quant)
    if fmt == "gguf":
        from agent_prune.models.gguf_export import export_gguf

        summary = export_gguf(model, tokenizer, out, manifest, quant=quant, reference=reference)
        return {"format": "gguf", "bytes": summary.gguf_bytes, **summary.model_dump()}
    from agent_prune.models.export import export_model

    summary = export_model(model, tokenizer, out, manifest)
    return {"format": "hf", "bytes": summary.safetensors_bytes, **summary.model_dump()}


def engines_that_load(fmt: str, heterogeneous: bool, extra_biases: bool = False) -> str:
    """Where an export of this format and shape runs, in words for the report. ``extra_biases``: the
    folder carries o_proj/down_proj biases its family's stock layers lack (only Llama's config flags
    give them; the GGUF export takes Llama only)."""
    if fmt == "gguf":
        return ("llama.cpp and GGUF engines built on it (architecture `llama`)" if not heterogeneous else
                "llama.cpp (architecture `deci`: per-layer head counts and feed-forward lengths); "
                "engines that read only `llama` GGUFs do not")
    if extra_biases:
        return ("transformers with `trust_remote_code=True`; not vLLM or TensorRT-LLM, whose layers of "
                "this family have no o_proj/down_proj biases (bias compensation added them)")
    if not heterogeneous:
        return "transformers, vLLM, TensorRT-LLM (a stock config); llama.cpp after `--format gguf`"
    return ("transformers with `trust_remote_code=True`; llama.cpp after `--format gguf`; not vLLM or "
            "TensorRT-LLM, which build every layer from the global sizes (`--uniform-width` makes one "
            "that they load)")
