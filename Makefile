# Surge — two commands: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench chaos lock doctor clean install \
        cluster-deps cluster-up cluster-down cluster-test

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Surge needs Python 3.11+")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

## Start everything on this machine: embedded PostgreSQL + Redis (unless URLs are set),
## migrations, demo data, API processes and a worker fleet. Ctrl-C stops it all.
run: $(STAMP)
	$(BIN)/surge up

## Lint, type-check and run the whole suite against real PostgreSQL and Redis.
test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench migrations
	$(BIN)/ruff format --check src tests bench migrations

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

## Every fault (kill -9, stops, freezes, partitions, latency, resets, a 10x spike) injected
## under open-loop load, checked after each; report in bench/results/chaos.{json,html}.
## `pytest -m chaos` runs the chaos-marked tests alone.
chaos: $(STAMP)
	$(BIN)/surge bench chaos

## Scale out (issue 18, docs/scaling.md): the Debian packages the cluster runs on (root), then
## a cluster in network namespaces on this machine; `cluster-test` breaks it under load.
CLUSTER_PACKAGES := patroni etcd-server etcd-client pgbouncer haproxy redis-sentinel nginx \
                    postgresql-15 redis-server
cluster-deps:
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(CLUSTER_PACKAGES)

cluster-up: $(STAMP)
	$(BIN)/surge cluster up

cluster-down: $(STAMP)
	$(BIN)/surge cluster down

cluster-test: $(STAMP)
	$(BIN)/pytest -m cluster tests/cluster $(PYTEST_ARGS)

## All benchmarks; each writes bench/results/NAME.json.
bench: $(STAMP)
	$(BIN)/surge bench all

doctor: $(STAMP)
	$(BIN)/surge doctor

## Re-freeze the full dependency set after editing pyproject.toml.
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^surge' > constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
