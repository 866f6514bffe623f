"""The dense model's weights are file pages: unmapped between uses, read back unchanged."""

import re
from pathlib import Path

import pytest
import torch

from agent_prune.heap import release_memory
from agent_prune.models import mapped
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(mapped._MADVISE is None, reason="needs Linux's /proc/self/pagemap")


def rss_file_kib() -> int:
    return int(re.search(r"RssFile:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def saved_and_mapped(tmp_path):
    from transformers import AutoModelForCausalLM

    # wide enough that its weights span many pages: 2 x 256 x 2048 floats in the embeddings alone
    tiny_model("llama", hidden_size=256, intermediate_size=512).save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


def test_a_mapped_model_leaves_the_resident_set_and_reads_back_the_same(tmp_path):
    model = saved_and_mapped(tmp_path)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(ids).logits
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    resident = rss_file_kib()
    dropped = mapped.drop_mapped_pages(model)
    assert dropped > 1 << 20  # the weights were file pages, mapped in by the forward
    assert rss_file_kib() <= resident - dropped // 1024 // 2  # they left the resident set
    assert mapped.drop_mapped_pages(model) == 0  # nothing mapped in since
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # read back from the page cache, the same bits
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_written_weights_and_ordinary_memory_are_never_dropped(tmp_path):
    anonymous = tiny_model("llama")
    assert mapped.drop_mapped_pages(anonymous) == 0  # ordinary (anonymous) memory: nothing to do
    model = saved_and_mapped(tmp_path)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight.add_(1.0)  # copied on write: those pages are the process's own now
    expected = weight.detach().clone()
    mapped.drop_mapped_pages(model)
    assert torch.equal(weight, expected)


def test_registered_models_are_unmapped_at_every_trim(tmp_path):
    model = saved_and_mapped(tmp_path)
    with torch.no_grad():
        model(torch.arange(4)[None])
        assert mapped.drop_mapped_pages(model) > 0  # the forward mapped its pages in
        model(torch.arange(4)[None])  # and in again
    mapped.keep_unmapped(model)
    release_memory()
    assert mapped.drop_mapped_pages(model) == 0  # the trim already unmapped them
