"""Run options from a TOML config file (flags override it)."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import ValidationError

from agent_prune.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def load_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"config file {path} does not exist", "check the path passed to --config")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config file {path} is not valid TOML: {exc}", "fix the file") from None
    # Accept both flat files and a [run] table; keys may use dashes like the flags.
    data = data.get("run", data)
    return {key.replace("-", "_"): value for key, value in data.items()}


def validation_message(exc: ValidationError) -> str:
    """One line naming the first invalid option and why."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "options"
    return f"invalid option {where.replace('_', '-')}: {error['msg']}"
