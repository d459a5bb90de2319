# Kronos serving: the two commands users need are `make test` and `make serve`.
# Both set everything up on a fresh machine (virtual environment, packages, system tools).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Second environment: the model package, forecaster and pyfunc under pandas 3 (no MLServer).
VENV_PD3 := .venv-pandas3
BIN_PD3 := $(VENV_PD3)/bin
STAMP_PD3 := $(VENV_PD3)/.installed
PIP_PD3 := $(BIN_PD3)/python -m pip --disable-pip-version-check -q

.PHONY: help secrets venv system test test-pandas3 test-fast lint serve bench bench-train bench-batch demo-model demo-model-card demo-live bench-shadow loadtest soak clean

help:
	@echo "make test    - set up (venv, packages, system services) and run the whole test suite"
	@echo "make test-pandas3 - model and pyfunc tests in a second venv with pandas 3 (no MLServer)"
	@echo "make serve   - set up and run the serving stack on the embedded default registry"
	@echo "make bench   - model-level benchmark: reference vs fast generation"
	@echo "make bench-train - training step vs upstream Kronos (needs ../shared/reference)"
	@echo "make bench-batch - batch forecasts: Spark local[1] / local[2] vs one pyfunc call vs a loop"
	@echo "make demo-model - train the shipped demo model from scratch (CPU, <30 min) + its model card"
	@echo "make demo-live - champion + shadow challenger, a replayed month, the live table, promote on it"
	@echo "make bench-shadow - champion latency through the gateway with and without the shadow copy"
	@echo "make lint    - ruff check, ruff format --check, mypy (also run by make test)"
	@echo "make loadtest - Locust, headless and bounded, against a running stack (make serve)"
	@echo "make soak    - start a local stack, soak it below and above capacity, check"
	@echo "make secrets - create the compose stack's missing registry and live-store password files under ./secrets/"

# torch first, from the CPU wheel on disk; then the project with torch pinned so that no
# other torch build is ever pulled in.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIN) 2>&1 | grep -v "^WARNING: Location" || true
	echo "$(TORCH_PIN)" > $(VENV)/torch-constraint.txt
	$(PIP) install -c $(VENV)/torch-constraint.txt -e '.[dev,serving]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, mlflow, mlserver, pandas, pyspark; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

venv: $(STAMP)

# The same order for the pandas-3 environment: torch first, then the core and the test
# tools with pandas >= 3, without the MLServer layer (`serving` extra: pandas < 3).
$(STAMP_PD3): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN_PD3)/python || $(PYTHON) -m venv $(VENV_PD3)
	$(PIP_PD3) install $(TORCH_PIN) 2>&1 | grep -v "^WARNING: Location" || true
	echo "$(TORCH_PIN)" > $(VENV_PD3)/torch-constraint.txt
	$(PIP_PD3) install -c $(VENV_PD3)/torch-constraint.txt -e '.[test]' 'pandas>=3' 2>&1 \
	  | grep -v "^WARNING: Location" || true
	$(BIN_PD3)/python -c "import torch, mlflow, pandas, hypothesis; \
	  assert torch.__version__.startswith('2.13.0'), torch.__version__; \
	  assert int(pandas.__version__.split('.')[0]) >= 3, pandas.__version__"
	touch $(STAMP_PD3)

system:
	bash scripts/setup-system.sh

test: venv system lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-pandas3

# tests/model and tests/pyfunc (test_serve.py included: `mlflow models serve`) under pandas 3.
test-pandas3: $(STAMP_PD3)
	$(BIN_PD3)/python -m pytest -q tests/model tests/pyfunc $(PYTEST_ARGS_PD3)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

# The same checks as .pre-commit-config.yaml (`.venv/bin/pre-commit install` runs them on
# every commit).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv
	$(BIN)/python -m model_package.bench $(BENCH_ARGS)

bench-batch: venv system
	$(BIN)/python -m batch.bench $(BENCH_ARGS)

# Training throughput (windows/s) of our training step against upstream Kronos's, same batch,
# same process; upstream's code is read from ../shared/reference/kronos-upstream.
bench-train: venv
	$(BIN)/python -m model_package.bench_training $(BENCH_ARGS)

# Trains model_package/demo_weights from scratch (seeded, one CPU thread) on the S&P 500 and
# NASDAQ daily candles that `arch` ships, then backtests it on the held-out years and writes
# model_package/demo_weights/MODEL_CARD.md. `make demo-model-card` re-evaluates only.
demo-model: venv
	$(BIN)/python -m registry_scripts.demo_model all

demo-model-card: venv
	$(BIN)/python -m registry_scripts.demo_model card

# Live evidence end to end (serving/live/demo.py): a temporary registry (v1 untrained
# champion, v2 the trained demo model as challenger), two MLServers, the gateway shadowing
# the challenger, a held-out month replayed as requests plus outcomes, the live table, the
# gauges of the Grafana row and `promote --evidence live` (about a minute on 2 cores).
demo-live: venv system
	$(BIN)/python -m serving.live.demo $(DEMO_ARGS)

# Champion latency through the gateway with and without the shadow copy (the challenger at
# nice 19), alternating requests; prints medians, p90s and their ratio.
bench-shadow: venv system
	$(BIN)/python -m serving.loadtest.shadow_bench $(BENCH_ARGS)

# Registers NeoQuasar/Kronos-small as kronos@champion when the registry has none (the shipped
# trained demo model, model_package/demo_weights, when the hub is unreachable), then runs MLServer on
# 127.0.0.1:8080 (REST), 8081 (gRPC), 8082 (metrics). Registry: MLFLOW_TRACKING_URI, default
# .state/mlflow. Other host, ports or state folder: KRONOS_SERVER_HOST, KRONOS_SERVER_HTTP_PORT,
# KRONOS_SERVER_GRPC_PORT, KRONOS_SERVER_METRICS_PORT, KRONOS_STATE_DIR (see serving/__main__.py),
# as environment or make variables: make serve KRONOS_SERVER_HTTP_PORT=9080 ...
serve: venv
	$(BIN)/python -m serving $(SERVE_ARGS)

# Locust (serving/loadtest/locustfile.py) against an already running stack (`make serve`
# in another shell): REST + gRPC users, LOADTEST_USERS users for LOADTEST_DURATION;
# CSV and HTML reports in LOADTEST_REPORTS (git-ignored).
LOADTEST_HOST ?= http://127.0.0.1:8080
LOADTEST_GRPC ?= 127.0.0.1:8081
LOADTEST_USERS ?= 4
LOADTEST_DURATION ?= 60s
LOADTEST_REPORTS ?= loadtest-reports
loadtest: venv
	@curl -fsS -o /dev/null $(LOADTEST_HOST)/v2/health/ready || { \
	  echo "no ready server at $(LOADTEST_HOST): start one with 'make serve'"; exit 1; }
	mkdir -p $(LOADTEST_REPORTS)
	$(BIN)/locust -f serving/loadtest/locustfile.py --headless --only-summary \
	  -u $(LOADTEST_USERS) -r $(LOADTEST_USERS) -t $(LOADTEST_DURATION) --stop-timeout 120 \
	  --host $(LOADTEST_HOST) --grpc-target $(LOADTEST_GRPC) \
	  --csv $(LOADTEST_REPORTS)/loadtest --html $(LOADTEST_REPORTS)/loadtest.html $(LOADTEST_ARGS)

# Bounded soak (a few minutes): starts its own MLServer (the demo model, temporary registry,
# free ports), checks zero failures below capacity, fast 503s above it, RSS growth, health.
soak: venv
	$(BIN)/python -m serving.loadtest.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(VENV_PD3) .pytest_cache .benchmarks

# The compose stack's registry secrets (docs/registry-auth.md): random values for the files
# that do not exist yet; existing files are kept (rotate: edit one, rerun `auth-setup`).
REGISTRY_SECRETS := mlflow_admin_password mlflow_flask_secret_key mlflow_serving_password \
  mlflow_scientist_password mlflow_manager_password live_db_password
secrets:
	@mkdir -p -m 700 secrets
	@for name in $(REGISTRY_SECRETS); do \
	  if [ -s "secrets/$$name" ]; then echo "secrets/$$name: kept"; \
	  else (umask 022; head -c 24 /dev/urandom | base64 > "secrets/$$name") && echo "secrets/$$name: created"; fi; \
	done
