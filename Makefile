# precog_db developer tasks. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ENV ?= dev

.PHONY: install demo test test-lowest lint typecheck pytest clean check migrate migrate-status backup local-up local-down bench bench-quick

# The virtualenv is rebuilt whenever pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## Run the example trading service against dev (starts a throwaway local PostgreSQL if none is reachable).
demo: install
	$(BIN)/python examples/demo.py

## Lint, type-check and run the whole test suite against real PostgreSQL.
test: lint typecheck pytest

lint: install
	$(BIN)/ruff check precog_db tests examples bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest

## The test suite against the LOWEST versions of psycopg, psycopg-pool, python-dotenv and structlog
## that pyproject.toml allows (pinned in .ci/lowest-versions.txt), in a second virtualenv.
LOWEST_VENV ?= .venv-lowest
LOWEST_BIN := $(LOWEST_VENV)/bin

$(LOWEST_BIN)/.installed: pyproject.toml .ci/lowest-versions.txt
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_BIN)/python -m pip install --quiet --upgrade pip
	$(LOWEST_BIN)/python -m pip install --quiet -e '.[dev]' -r .ci/lowest-versions.txt
	touch $@

test-lowest: $(LOWEST_BIN)/.installed
	$(LOWEST_BIN)/python -m pip list 2>/dev/null | grep -i -E '^(psycopg|psycopg-binary|psycopg-pool|python-dotenv|structlog) '
	$(LOWEST_BIN)/python -m pytest

## Database tasks through precog-db, for ENV (default dev): `make migrate ENV=test`.
check: install
	$(BIN)/precog-db --env $(ENV) check

migrate: install
	$(BIN)/precog-db --env $(ENV) migrate up

migrate-status: install
	$(BIN)/precog-db --env $(ENV) migrate status

backup: install
	$(BIN)/precog-db --env $(ENV) backup

## A throwaway PostgreSQL under .precog/ with precog_dev and precog_test (ENV only picks the banner/URL).
local-up: install
	$(BIN)/precog-db --env $(ENV) local up

local-down: install
	$(BIN)/precog-db --env $(ENV) local down

## Benchmark get_cursor against the bare driver, psycopg_pool, psycopg2, asyncpg and pgbench
## (about 8 minutes on 2 cores; see docs/PERFORMANCE.md). `make bench BENCH_ARGS=--quick` is a smoke run.
bench: $(BIN)/.bench-installed
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: $(BIN)/.bench-installed
	$(BIN)/python -m bench --quick

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

clean:
	rm -rf $(VENV) $(LOWEST_VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
