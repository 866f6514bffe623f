# Two entry points (see README): `make demo` runs the main job on the shared model, `make test` runs
# the test suite. Both set up a virtual environment from this project's own files first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
# A CPU build of torch: on these machines pip takes it from a local file; elsewhere from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-fast demo lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	AGENT_PRUNE_SHARED=$(SHARED) $(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

lint: setup
	$(VENV)/bin/ruff check agent_prune tests bench

demo: setup
	$(VENV)/bin/agent-prune eval --model $(SHARED)/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
		--data-dir $(SHARED)/data --tasks wikitext2,freebaseqa,arc_easy --seqlen 512 --windows 32 --limit 300
