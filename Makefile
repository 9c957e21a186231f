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

# The scaling figures in one run, then their table (outputs/bench/bench.json, table.md): 12.7 min
# on a fresh clone here (2 cores), 5.5 min of it generating, bias-correcting and registering the
# source cohort (cached for later runs). bench_n4.py (6 min: N4 at full resolution) and
# bench_registration.py (registration at 1 mm) are left out; add them with
#   make bench BENCH_EXTRA="bench/bench_n4.py bench/bench_registration.py"
# A bench that fails is reported and the others still run; the exit status says so.
bench: $(STAMP)
	@status=0; t0=$$(date +%s); \
	for b in bench/bench_source.py bench/bench_memory.py bench/bench_dense.py \
	    bench/bench_transfer.py bench/bench_extraction.py bench/bench_predict.py $(BENCH_EXTRA); do \
	  start=$$(date +%s); echo "== $$b"; \
	  $(PY) $$b || { status=1; echo "== $$b FAILED"; }; \
	  echo "== $$b: $$(( $$(date +%s) - start )) s"; \
	done; \
	$(PY) bench/table.py || status=1; \
	echo "== make bench: $$(( $$(date +%s) - t0 )) s in all"; exit $$status
