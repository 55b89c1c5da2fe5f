# precog_db developer tasks. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ENV ?= dev
# Extra options for the database targets (check, migrate, migrate-status, backup, local-*):
# ARGS is passed as is (`make migrate ENV=staging ARGS=--yes`); CONFIRM=NAME adds
# `--confirm-database NAME`, prod's typed confirmation without a terminal
# (`PRECOG_PROD_CONFIRMED=yes make migrate ENV=prod CONFIRM=precog_prod`).
ARGS ?=
CONFIRM ?=
# Appended after the command, where precog-db takes both global and command options (`ARGS="--keep 3"`).
DB_ARGS = $(if $(strip $(CONFIRM)), --confirm-database $(strip $(CONFIRM)))$(if $(strip $(ARGS)), $(strip $(ARGS)))

.PHONY: install demo test test-lowest lint typecheck pytest generate check-generated clean check migrate migrate-status backup local-up local-down bench bench-quick docs

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
test: check-generated lint typecheck pytest

## The generated files: the sync modules from their asyncio sources (tools/async_to_sync.py,
## docs/DESIGN.md) and the settings table of docs/CONFIGURATION.md (tools/config_reference.py).
generate: install
	$(BIN)/python tools/async_to_sync.py
	$(BIN)/python tools/config_reference.py

check-generated: install
	$(BIN)/python tools/async_to_sync.py --check
	$(BIN)/python tools/config_reference.py --check

## The documentation site (mkdocs.yml, docs/) into site/: strict, so a warning or a broken link fails.
## Installs the `docs` extra into .venv only (never into .venv-lowest).
docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $@

lint: install
	$(BIN)/ruff check precog_db tests examples bench tools
	$(BIN)/ruff format --check precog_db tests examples bench tools

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
	$(LOWEST_BIN)/python -m pip list 2>/dev/null | grep -i -E '^(pglast|psycopg|psycopg-binary|psycopg-pool|python-dotenv|structlog) '
	$(LOWEST_BIN)/python -m pytest

## Database tasks through precog-db, for ENV (default dev): `make migrate ENV=test`; options in ARGS/CONFIRM (above).
check: install
	$(BIN)/precog-db --env $(ENV) check$(DB_ARGS)

migrate: install
	$(BIN)/precog-db --env $(ENV) migrate up$(DB_ARGS)

migrate-status: install
	$(BIN)/precog-db --env $(ENV) migrate status$(DB_ARGS)

backup: install
	$(BIN)/precog-db --env $(ENV) backup$(DB_ARGS)

## A throwaway PostgreSQL (state in .precog/) with precog_dev and precog_test, created and stamped
## (ENV only picks the banner/URL). It keeps running until `make local-down`.
local-up: install
	$(BIN)/precog-db --env $(ENV) local up$(DB_ARGS)

local-down: install
	$(BIN)/precog-db --env $(ENV) local down$(DB_ARGS)

## Benchmark get_cursor against the bare driver, psycopg_pool, psycopg2, asyncpg and pgbench
## (about 6 minutes on 2 cores; see docs/PERFORMANCE.md). `make bench BENCH_ARGS=--quick` is a smoke run.
bench: $(BIN)/.bench-installed
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: $(BIN)/.bench-installed
	$(BIN)/python -m bench --quick

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

clean:
	rm -rf $(VENV) $(LOWEST_VENV) site .pytest_cache .mypy_cache .ruff_cache build *.egg-info
