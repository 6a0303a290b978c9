# kodalle: `make demo` runs the whole pipeline on built-in synthetic data, `make test` the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kodalle-installed
DEMO_OUT ?= demo

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# Idempotent: re-runs only when the install inputs change.
$(STAMP): pyproject.toml Makefile scripts/install_oracles.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) scripts/install_oracles.py
	touch $(STAMP)

demo: install
	$(VENV)/bin/kodalle demo --out $(DEMO_OUT)

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

# the inner loop: everything but the end-to-end tests marked slow (CI runs `make test`)
test-fast: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m "not slow"

# Every script in benchmarks/ but the harness, run as modules (they import the harness).
# Run it alone on the machine: docs/benchmarks.md.
# BENCH_ARGS="--quick": a smoke run; BENCH_ARGS="--json bench.json": every table as JSON too.
# gpu.py needs a CUDA device (elsewhere: python -m benchmarks.gpu --quick smoke-runs it).
bench: install
	@for b in benchmarks/*.py; do n=$$(basename $$b .py); \
	  if [ $$n = harness ]; then continue; fi; \
	  if [ $$n = gpu ] && ! $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	    echo "== $$b: skipped, no CUDA device"; continue; fi; \
	  echo "== $$b $(BENCH_ARGS)"; $(PY) -m benchmarks.$$n $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
