# The two set-up commands: `make run` (whole system, no servers needed) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export VAR_DIR ?= $(CURDIR)/var

.PHONY: run test lint format clean

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

# Runs web, three workers, beat, Flower and the sandbox provider under honcho; Ctrl-C stops them all.
# Without DATABASE_URL/REDIS_URL: SQLite in var/ and the filesystem broker in var/broker (wiped here).
run: $(VENV)/.runtime
	rm -rf $(VAR_DIR)/broker
	mkdir -p $(VAR_DIR)/broker/queue $(VAR_DIR)/broker/control $(VAR_DIR)/broker/processed
	export DEBUG=$${DEBUG:-true} PATH=$(CURDIR)/$(BIN):$$PATH \
	  SHOP_WEBHOOK_URL=$${SHOP_WEBHOOK_URL:-http://127.0.0.1:8000/payments/webhooks/provider/} && \
	  python manage.py migrate --noinput && \
	  python manage.py collectstatic --noinput -v 0 && \
	  python manage.py seed_demo && \
	  echo "Shop: http://127.0.0.1:8000/   Flower: http://127.0.0.1:5555/   Sandbox provider: http://127.0.0.1:8100/v1/faults" && \
	  exec honcho start -f Procfile

test: $(VENV)/.dev
	$(BIN)/pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VAR_DIR) staticfiles
