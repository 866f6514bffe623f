"""A content-addressed cache of evaluation results, so the dense model is measured once per protocol.

Every run's report evaluates the dense model on the same test protocol (minutes of generation and
scoring on a CPU); the figures depend only on the model's files, the data files, the protocol and
the code that measures them, so they are stored under a key hashed from all of these:

- the model: sha256 of its weight and tokenizer files (the ``.gguf`` file, or every file of a folder);
- the data: sha256 of the task's local files;
- the protocol: task, item limit, seqlen, windows, batch size, dtype, device kind;
- the code: sha256 of the sources of ``agent_prune.evaluation``, ``agent_prune.data`` and
  ``agent_prune.models.loading``, and the torch, transformers and gguf versions.

The run's in-loop scores of the dense model (``score dense``) are cached the same way, keyed on the
loop evaluator's settings and its data files, and so is the dense model's sensitivity profile (the
first iteration's, the same for every target of a model), keyed on the calibration settings and
the profiling code (``PROFILE_SOURCES``). Models and data from the hub are not cached (their
content is not in hand to hash).

Where: ``$AGENT_PRUNE_EVAL_CACHE`` when set (``off`` disables the cache), else
``<agent-prune cache>/evals`` (``$AGENT_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/agent-prune``, else
``~/.cache/agent-prune``). One JSON file per key, written atomically; a file that does not parse or
does not carry its key is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from contextlib import suppress
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from pathlib import Path

from agent_prune.errors import InputError
from agent_prune.io import atomic_write_json

EVAL_CACHE_ENV = "AGENT_PRUNE_EVAL_CACHE"
PACKAGE = Path(__file__).resolve().parents[1]
CODE_SOURCES = ("evaluation", "data", "models/loading.py", "models/precision.py", "agent/scoring.py")
PROFILE_SOURCES = ("sensitivity", "data", "models")
LIBRARIES = ("torch", "transformers", "gguf")


def cache_dir() -> Path | None:
    """The cache folder, or None when ``$AGENT_PRUNE_EVAL_CACHE`` is ``off``."""
    chosen = os.environ.get(EVAL_CACHE_ENV)
    if chosen:
        return None if chosen.lower() == "off" else Path(chosen).expanduser()
    from agent_prune.models.loading import cache_root

    return cache_root() / "evals"


def _update_with_file(h, path: Path) -> None:
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)


def files_digest(paths: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over the files' names (relative to ``root``) and contents, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(root) if root else path.name).encode() + b"\0")
        _update_with_file(h, path)
        h.update(b"\0")
    return h.hexdigest()


def folder_files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


@cache
def code_digest(sources: tuple[str, ...] = CODE_SOURCES) -> str:
    """The measuring code (``sources``, relative to the package) and library versions, so a change
    to either invalidates old figures."""
    files = [f for part in sources for f in folder_files(PACKAGE / part) if f.suffix == ".py"]
    h = hashlib.sha256(files_digest(files, root=PACKAGE).encode())
    for library in LIBRARIES:
        try:
            h.update(f"{library}={metadata.version(library)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{library}=none".encode())
    return h.hexdigest()


def entry_key(model_digest: str, data_digest: str, protocol: dict,
              sources: tuple[str, ...] = CODE_SOURCES) -> str:
    payload = json.dumps({"model": model_digest, "data": data_digest, "protocol": protocol,
                          "code": code_digest(sources)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_entry(path: Path, key: str) -> dict | None:
    """The cached result at ``path``, or None when absent, unreadable, or not for ``key``."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("result"), dict):
        return None
    return entry


def cached(key: str, protocol: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``'s result for ``key``: read from the cache, or computed and stored.

    A hit carries ``cache: {"created", "key"}`` so reports can say the figure was measured earlier."""
    folder = cache_dir()
    if folder is None:
        return compute()
    path = folder / f"{key}.json"
    entry = read_entry(path, key)
    if entry is not None:
        return {**entry["result"], "cache": {"created": entry["created"], "key": key}}
    result = compute()
    with suppress(InputError):  # a cache that cannot be written (full disk, read-only) must not fail a run
        atomic_write_json(path, {"key": key, "protocol": protocol, "result": result,
                                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return result


def model_digest(kind: str, path: str, gguf_file: str | None) -> str | None:
    """sha256 of a local model's files (a ``ModelSource``'s fields); None for a hub id."""
    if kind == "hub":
        return None
    root = Path(path)
    return files_digest([root / gguf_file] if gguf_file else folder_files(root), root=root)


def data_digest(data_dir: Path | None, relatives: Iterable[str]) -> str | None:
    """sha256 of the local data files (or folders) named relative to ``data_dir``; None when the
    data comes from the hub or a file is missing (the evaluation then reports the problem)."""
    if data_dir is None:
        return None
    paths = [data_dir / relative for relative in relatives]
    if not all(path.exists() for path in paths):
        return None
    return files_digest([f for path in paths for f in folder_files(path)], root=data_dir)


def task_files(task: str) -> list[str]:
    """The data files a report task reads, relative to the data directory."""
    from agent_prune.data.corpora import WIKITEXT_FILES
    from agent_prune.data.tasks import FREEBASEQA_FILE, MC_FILES

    return [{"wikitext2": WIKITEXT_FILES["test"], "freebaseqa": FREEBASEQA_FILE, **MC_FILES}[task]]
