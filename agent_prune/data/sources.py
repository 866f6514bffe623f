"""Where data comes from: a local data directory (offline) or the Hugging Face hub via ``datasets``.

The local layout is the one in ``../shared/README.md``::

    wikitext-2-raw/wikitext-2-raw-v1.{test,validation}.jsonl   {"text"}
    c4/c4_en_train_first1000.jsonl                             {"text", ...}
    freebaseqa/freebaseqa_dev.jsonl                            {"id", "question", "answers"}
    mc/{arc_easy,arc_challenge}_validation.jsonl, mc/csqa_dev.jsonl, mc/mmlu_dev/*.csv

The directory comes from ``--data-dir`` or ``$AGENT_PRUNE_DATA_DIR``; without either, loaders use
the hub (which needs network access).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from agent_prune.errors import InputError

DATA_DIR_ENV = "AGENT_PRUNE_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local data directory to use, or None for the hub. A named but missing dir is an error."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if chosen is None or str(chosen) == "":
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise InputError(f"data directory {chosen} does not exist",
                         f"fix {origin}, or unset it to use the Hugging Face hub")
    return path


def local_file(data_dir: Path, relative: str) -> Path:
    path = data_dir / relative
    if not path.exists():
        raise InputError(f"{path} is missing from the data directory",
                         "see README 'Data' for the expected layout")
    return path


def read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{path}:{line_no} is not valid JSON",
                                     "the data file is corrupt; restore it") from None


def read_csv_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def hub_dataset(name: str, config: str | None = None, split: str = "test", **kwargs):
    """Load a split from the hub; a failure (offline, say) is a one-line error naming the fix."""
    try:
        import datasets

        datasets.disable_progress_bars()
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types for network and cache failures
        raise InputError(
            f"could not load {name} from the Hugging Face hub ({type(exc).__name__})",
            f"pass --data-dir or set ${DATA_DIR_ENV} to a local data directory",
        ) from None
