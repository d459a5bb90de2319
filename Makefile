# Kronos serving: the two commands users need are `make test` and `make serve`.
# Both set everything up on a fresh machine (virtual environment, packages, system tools).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: help venv system test test-fast lint serve bench loadtest soak clean

help:
	@echo "make test    - set up (venv, packages, system services) and run the whole test suite"
	@echo "make serve   - set up and run the serving stack on the embedded default registry"
	@echo "make bench   - model-level benchmark: reference vs fast generation"
	@echo "make lint    - ruff"

# torch first, from the CPU wheel on disk; then the project with torch pinned so that no
# other torch build is ever pulled in.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIN) 2>&1 | grep -v "^WARNING: Location" || true
	echo "$(TORCH_PIN)" > $(VENV)/torch-constraint.txt
	$(PIP) install -c $(VENV)/torch-constraint.txt -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, mlflow, mlserver, pandas; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

venv: $(STAMP)

system:
	bash scripts/setup-system.sh

test: venv system
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python -m model_package.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
