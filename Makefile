# csmf: the first two targets are the README's first two commands.
#   make run    # whole pipeline on generated data, embedded Prefect + MLflow (no server)
#   make test   # the test suite
# Each target creates the local virtual environment (.venv, pinned stack) when it is missing.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export OMP_NUM_THREADS ?= 2

.PHONY: run test test-fast lint bench venv clean ui serve stop

run: $(STAMP)
	$(BIN)/csmf run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check csmf_core flows data_contracts tests bench
	$(BIN)/ruff format --check csmf_core flows data_contracts tests bench

bench: $(STAMP)  # BENCH_ARGS=--full: scaling at 1M / 4M / 16M exposures instead of 0.5M / 2M, and Dask ingest (docs/performance.md)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

ui: $(STAMP)
	$(BIN)/csmf ui

# Persistent local Prefect server + process work pool + deployments (prefect.yaml) + worker on
# 127.0.0.1 (state and PIDs under $(CSMF_HOME) or ./.csmf/serve); `make stop` stops exactly those.
# BACKEND=postgres: PostgreSQL (apt-get installed when missing) + an MLflow server and the Prefect
# server on it; the default, sqlite, keeps Prefect and MLflow on SQLite files of the home.
BACKEND ?= sqlite
serve: $(STAMP)
	$(BIN)/python -m flows.deploy up --backend $(BACKEND) $(ARGS)

stop:
	$(BIN)/python -m flows.deploy down $(ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "csmf needs Python 3.11 ($(PY) not found)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and alone, pinned: an open range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# Prefect's database, migrated once: every new csmf home starts from it (flows/local_api.py)
	$(BIN)/python -m flows.local_api --build-template || echo "no Prefect database template: each new home migrates its own"
	# MLflow's store likewise (flows/tracking.py)
	$(BIN)/python -m flows.tracking --build-template || echo "no MLflow database template: each new home migrates its own"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
