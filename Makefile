# subseg: two commands on a fresh machine — `make demo` and `make test`.
# Each creates (or reuses) the virtual environment in .venv and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.subseg-installed
# The CPU build lies on this machine's disk and `torch==2.13.0` takes it; on a GPU machine the
# same line takes the CUDA build from PyPI. Override to choose another, e.g.
#   make demo TORCH_SPEC="torch==2.13.0+cpu"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-quick test test-fast lint format clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py

demo-quick: $(STAMP)
	$(PY) demo.py --config-name demo_quick

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
