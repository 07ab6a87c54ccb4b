# llmrec: `make demo` sets everything up and runs the daily DAG end to end; `make test` runs the tests.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# This machine's pip config names local mirror folders that may be absent: drop pip's notes about them.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := $(CURDIR)/.demo
export AIRFLOW_HOME ?= $(DEMO_DIR)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Idle OpenMP threads must not spin: LightGBM is several times slower beside busy-waiting torch threads.
export OMP_WAIT_POLICY := PASSIVE
DEMO_STORE := file://$(DEMO_DIR)/store
DEMO_DATE ?= 2026-11-01
DEMO_NAMESPACE := demo

.PHONY: install system-deps demo test test-fast lint format clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -r requirements-dev.txt 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	touch $(STAMP)

# The demo runs the generated sample in its own namespace (the sample is refused in production).
# No run deadline: in Airflow 3.3.2 `airflow dags test` crashes at the end of a run with one.
demo: export LLMREC_RUN_DEADLINE_HOURS := 0
demo:
	@echo "[1/3] install $(VENV) from requirements-dev.txt (the first time: a few minutes)"
	@$(MAKE) --no-print-directory -s install
	@mkdir -p $(DEMO_DIR) $(AIRFLOW_HOME)
	@echo "[2/3] airflow db migrate (log: $(DEMO_DIR)/db-migrate.log)"
	@$(BIN)/airflow db migrate > $(DEMO_DIR)/db-migrate.log 2>&1 \
		|| { tail -n 40 $(DEMO_DIR)/db-migrate.log; echo "full log: $(DEMO_DIR)/db-migrate.log"; exit 1; }
	@echo "[3/3] airflow dags test llmrec_daily $(DEMO_DATE): data sample, namespace $(DEMO_NAMESPACE) (log: $(DEMO_DIR)/dags-test.log)"
	@PYTHONUNBUFFERED=1 $(BIN)/airflow dags test llmrec_daily $(DEMO_DATE) \
		--conf '{"data_uri": "sample", "namespace": "$(DEMO_NAMESPACE)", "store_uri": "$(DEMO_STORE)"}' 2>&1 \
		| $(BIN)/llmrec demo-progress --log $(DEMO_DIR)/dags-test.log
	@echo
	@$(BIN)/llmrec summary --store $(DEMO_STORE) --namespace $(DEMO_NAMESPACE)
	@echo
	@$(BIN)/llmrec next-steps --store $(DEMO_STORE) --namespace $(DEMO_NAMESPACE)

# The browser tests drive Debian's Chromium (Playwright cannot download its own browser here).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not integration and not browser"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
