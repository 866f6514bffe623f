"""The content-addressed evaluation cache: keys, hits, corrupt entries, where it lives."""

import json

import pytest

from agent_prune.evaluation import cache


def counting(result: dict):
    calls = []

    def compute() -> dict:
        calls.append(1)
        return result

    return compute, calls


def test_a_second_lookup_reads_the_stored_result():
    compute, calls = counting({"acc": 0.5})
    key = cache.entry_key("model", "data", {"task": "arc_easy", "limit": 8})
    first = cache.cached(key, {"task": "arc_easy"}, compute)
    second = cache.cached(key, {"task": "arc_easy"}, compute)
    assert len(calls) == 1
    assert first == {"acc": 0.5} and second["acc"] == 0.5 and second["cache"]["key"] == key


def test_the_key_changes_with_model_data_and_protocol():
    base = cache.entry_key("m", "d", {"task": "wikitext2", "windows": 32})
    assert base == cache.entry_key("m", "d", {"windows": 32, "task": "wikitext2"})  # order-free
    assert len({base, cache.entry_key("m2", "d", {"task": "wikitext2", "windows": 32}),
                cache.entry_key("m", "d2", {"task": "wikitext2", "windows": 32}),
                cache.entry_key("m", "d", {"task": "wikitext2", "windows": 16})}) == 4


@pytest.mark.parametrize("text", ["{not json", '{"key": "other", "result": {}}', "[]", '{"key": "K"}'])
def test_a_corrupt_or_foreign_entry_is_ignored_and_rewritten(text):
    folder = cache.cache_dir()
    key = cache.entry_key("m", "d", {"task": "freebaseqa", "limit": 4})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{key}.json").write_text(text.replace('"K"', json.dumps(key)))
    compute, calls = counting({"exact_match": 0.25})
    assert cache.cached(key, {}, compute) == {"exact_match": 0.25}
    assert json.loads((folder / f"{key}.json").read_text())["result"] == {"exact_match": 0.25}
    assert cache.cached(key, {}, compute)["exact_match"] == 0.25 and len(calls) == 1


def test_off_disables_the_cache_and_xdg_places_it(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENT_PRUNE_EVAL_CACHE", "off")
    compute, calls = counting({"acc": 1.0})
    cache.cached("k", {}, compute)
    cache.cached("k", {}, compute)
    assert len(calls) == 2
    monkeypatch.delenv("AGENT_PRUNE_EVAL_CACHE")
    monkeypatch.delenv("AGENT_PRUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "agent-prune" / "evals"


def test_file_digests_follow_content_not_timestamps(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"weights")
    first = cache.model_digest("gguf", str(tmp_path), "a.gguf")
    (tmp_path / "a.gguf").write_bytes(b"weights")  # rewritten: new mtime, same bytes
    assert cache.model_digest("gguf", str(tmp_path), "a.gguf") == first
    (tmp_path / "a.gguf").write_bytes(b"weightz")
    assert cache.model_digest("gguf", str(tmp_path), "a.gguf") != first
    assert cache.model_digest("hub", "org/model", None) is None
