"""Tokenizer metadata for a GGUF export: copied from the input GGUF, or built from the HF tokenizer.

A model that came from a GGUF keeps its tokenizer exactly (every ``tokenizer.*`` key, chat template
included, and the pre-tokenizer name that llama.cpp's converter chose for it). Otherwise the HF
tokenizer is converted with the ``gguf`` package's own readers; only byte-level BPE ("gpt2" in GGUF
terms: Llama 3, SmolLM, Qwen, GPT-2) is supported, and llama.cpp's ``default`` pre-tokenizer is
named because the converter's table of pre-tokenizer hashes is not part of the ``gguf`` package.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf

from agent_prune.errors import InputError

HF_PRE_TOKENIZER = "default"


def copy_gguf_fields(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, prefix: str,
                     skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every metadata field of ``reader`` whose key starts with ``prefix``, except ``skip``
    (keys the writer sets itself); returns the keys copied."""
    copied = []
    for key, field in reader.fields.items():
        if not key.startswith(prefix) or key in skip:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
        copied.append(key)
    return copied


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int,
                  reference: gguf.GGUFReader | None) -> str:
    """Write the tokenizer metadata; returns where it came from (for the export summary)."""
    if reference is not None and "tokenizer.ggml.model" in reference.fields:
        copy_gguf_fields(writer, reference, "tokenizer.")
        return "copied from the input GGUF"
    if tokenizer is None:
        raise InputError("a GGUF export needs a tokenizer and none came with the model",
                         "export a model loaded with its tokenizer")
    with tempfile.TemporaryDirectory(prefix="agent-prune-tok-") as folder:
        tokenizer.save_pretrained(folder)
        _add_hf_bpe(writer, Path(folder), vocab_size)
    return f"built from the Hugging Face tokenizer (byte-level BPE, pre-tokenizer '{HF_PRE_TOKENIZER}')"


def _add_hf_bpe(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except FileNotFoundError:
        raise InputError("GGUF export supports byte-level BPE tokenizers only (this one is not)",
                         "export with --format hf, or convert with llama.cpp's convert_hf_to_gguf.py"
                         ) from None
    tokens, types = [], []
    for text, _score, token_type in vocab.all_tokens():
        tokens.append(text if isinstance(text, str) else text.decode("utf-8"))
        types.append(token_type)
    if len(tokens) > vocab_size:
        raise InputError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings",
                         "pass the tokenizer that belongs to the model")
    # Embedding rows beyond the tokenizer (padding for alignment) get placeholder tokens, as the
    # converter does, so llama.cpp's token count matches the embedding matrix.
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(HF_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
