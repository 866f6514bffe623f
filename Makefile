# Two entry points (see README): `make demo` runs the main job on the shared model, `make test` runs
# the test suite. Both set up a virtual environment from this project's own files first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
# A CPU build of torch: on these machines pip takes it from a local file; elsewhere from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-fast test-min demo lint

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

# The fast tests with the lowest dependency versions pyproject.toml allows (own venv: .venv-min).
test-min:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash bench/min_versions.sh

lint: setup
	$(VENV)/bin/ruff check agent_prune tests bench

# The main job: prune the shared model to 20% with the heuristic planner. An existing run is resumed
# (a finished one just prints its summary) rather than overwritten.
DEMO_RUN ?= runs/demo
DEMO_MODEL ?= $(SHARED)/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

demo: setup
	@if [ -f $(DEMO_RUN)/run.json ]; then \
		$(VENV)/bin/agent-prune resume $(DEMO_RUN); \
	else \
		$(VENV)/bin/agent-prune run --model $(DEMO_MODEL) --data-dir $(SHARED)/data \
			--target-sparsity 0.2 --planner heuristic --out $(DEMO_RUN); \
	fi
	$(VENV)/bin/agent-prune trace $(DEMO_RUN) | tail -n 40
