"""Shared fixtures: tiny random models for every supported family, and the shared real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("AGENT_PRUNE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
SHARED_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_DATA = SHARED / "data"

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2")

# Tests share 2 cores with other jobs: with 2 intra-op threads a tiny forward pass took ~1 s under
# load (threads wait on each other), with 1 thread ~2 ms. Override with AGENT_PRUNE_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("AGENT_PRUNE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _private_eval_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty evaluation cache, so no figure leaks between tests or from ~/.cache."""
    monkeypatch.setenv("AGENT_PRUNE_EVAL_CACHE", str(tmp_path_factory.mktemp("evals")))


def tiny_config(family: str, **overrides):
    """A config small enough to build and run in milliseconds, with GQA (4 query / 2 KV heads)."""
    from transformers import AutoConfig

    params = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return AutoConfig.for_model(family, **params)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (fits the tiny models' vocabulary), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=symbols[0])


def tiny_merged_tokenizer():
    """``tiny_tokenizer`` with one BPE merge, for GGUF files that engines read back: llama.cpp and
    transformers' GGUF loader refuse a byte-level BPE without merges (the gguf package cannot write an
    empty list). Byte 0xFF, which UTF-8 text never holds, gives its id to the merged pair."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = [s for b, s in bytes_to_unicode().items() if b != 0xFF]
    vocab = {s: i for i, s in enumerate([*symbols, "Ġt"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=symbols[0])


def save_tiny(folder, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny model with its tokenizer as a Hugging Face folder (for CLI and loading tests)."""
    folder = Path(folder)
    tiny_model(family, seed, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def require_shared() -> None:
    if not SHARED_GGUF.is_file():
        pytest.skip(f"shared model not found at {SHARED_GGUF}")


@pytest.fixture(scope="session")
def shared_model():
    """The real shared model (dequantised GGUF), loaded once per test session."""
    require_shared()
    from agent_prune.models.loading import load_model

    return load_model(str(SHARED_GGUF))
