# `make demo` and `make test` set up what they need (.venv with pinned deps) and run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv demo-model clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	bash scripts/install-test-deps.sh
	$(PY) -m ruff check specserve tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

lint: $(STAMP)
	$(PY) -m ruff check specserve tests benchmarks
	$(PY) -m ruff format --check specserve tests benchmarks
	$(PY) -m mypy  # [tool.mypy] in pyproject.toml: engine, speculative, server

demo: $(STAMP)
	$(PY) -m specserve.demo

# Resumable; times full-size steps first (once) so every stage prints its estimate.
demo-model: $(STAMP)
	test -f build/demo/step_times.json || $(PY) -m specserve.train.bundle --estimate
	$(PY) -m specserve.train.bundle --out models/demo

clean:
	rm -rf $(VENV) .pytest_cache
