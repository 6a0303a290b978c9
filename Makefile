# kodalle: `make demo` runs the whole pipeline on built-in synthetic data, `make test` the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kodalle-installed
DEMO_OUT ?= demo

.PHONY: install demo test lint bench clean

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

# Run as modules: benchmarks/tokenize.py would hide the standard library's tokenize.
bench: install
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) -m benchmarks.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
