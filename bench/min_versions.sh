#!/usr/bin/env bash
# Install the lowest version of every declared dependency that pyproject.toml allows, then run the
# fast tests: a lower bound that does not hold fails here instead of on a user's machine.
#
#   bash bench/min_versions.sh            (or: make test-min)
#
# pip has no "lowest" resolution, so each `name>=X` becomes `name==X` in a constraints file.
# torch is the exception: it stays at TORCH_SPEC (machines here install a local CPU build only).
# Environment: PYTHON (default python3), MIN_VENV (default .venv-min), TORCH_SPEC (torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MIN_VENV=${MIN_VENV:-.venv-min}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

rm -rf "$MIN_VENV"
"$PYTHON" -m venv "$MIN_VENV"
PY="$MIN_VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_SPEC"

# pip's vendored packaging: the one copy of it a fresh venv is sure to have
"$PY" - > "$MIN_VENV/constraints.txt" <<'PYEOF'
import tomllib

from pip._vendor.packaging.requirements import Requirement

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
    req = Requirement(text)
    if req.name == "torch" or (req.marker and not req.marker.evaluate()):
        continue
    lower = [s.version for s in req.specifier if s.operator == ">="]
    if lower:
        print(f"{req.name}=={lower[0]}")
PYEOF
echo "lowest allowed versions:"; sed 's/^/  /' "$MIN_VENV/constraints.txt"
"$PY" -m pip install -q -c "$MIN_VENV/constraints.txt" -e ".[dev]"
"$PY" -m pip list --format=freeze > "$MIN_VENV/installed.txt"
"$PY" -m pytest -q -m "not integration" -p no:cacheprovider
