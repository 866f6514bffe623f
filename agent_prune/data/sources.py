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
from collections.abc import Iterable, Iterator
from pathlib import Path

from agent_prune.errors import InputError

DATA_DIR_ENV = "AGENT_PRUNE_DATA_DIR"
RESTORE_HINT = "restore the file from the data set's source (see README 'Data')"


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
    # Bytes per line, so that a file cut inside a multi-byte character is reported by line too.
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if raw.strip():
                yield _json_row(path, line_no, raw)


def _json_row(path: Path, line_no: int, raw: bytes) -> dict:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}:{line_no} is not valid JSON (the file is truncated or corrupt)",
                         RESTORE_HINT) from None


def check_jsonl_files(data_dir: Path | None, relatives: Iterable[str]) -> None:
    """Read every row of these local files once, so a corrupt one fails before a run writes anything."""
    if data_dir is None:
        return
    for relative in relatives:
        for _row in read_jsonl(local_file(data_dir, relative)):
            pass


def read_csv_rows(path: Path) -> list[dict]:
    rows = []
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                if None in row.values():  # DictReader fills the fields a cut row lacks with None
                    raise InputError(f"{path}:{reader.line_num} has fewer fields than the header (the "
                                     "file is truncated or corrupt)", RESTORE_HINT)
                rows.append(row)
    except (UnicodeDecodeError, csv.Error):
        raise InputError(f"{path} is not a readable CSV file (truncated or corrupt)", RESTORE_HINT) from None
    return rows


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
