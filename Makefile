# crmhooks developer tasks. `make test` is the one command CI runs (.ci/run).
#
#   make venv          .venv with the package and its test extras (re-installs when pyproject.toml changes)
#   make kafka-start   a local Kafka broker on 127.0.0.1:9092 (scripts/kafka-local)
#   make kafka-stop    stop it (KAFKA_STOP_ARGS=--wipe also deletes its state)
#   make lint          ruff check, ruff format --check, mypy
#   make test          venv + a fresh broker + lint + pytest; always stops the broker it started
#   make demo | bench  scripts/demo, scripts/bench
#   make clean         stop local brokers, remove var/ and tool caches (keeps .cache/ with the Kafka jars)

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Only directories that exist; mypy gets those holding Python files (its `files`
# setting names src, tests and bench, and mypy fails on a directory without any).
RUFF_CHECK_DIRS = $(wildcard src tests bench scripts)
RUFF_FORMAT_DIRS = $(wildcard src tests bench)
MYPY_DIRS = $(shell for d in src tests bench; do \
	[ -n "$$(find $$d -name '*.py' -print -quit 2>/dev/null)" ] && echo $$d; done)

.PHONY: help venv kafka-start kafka-stop lint test demo bench clean

help:
	@sed -n 's/^#   make /make /p' Makefile

venv: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
		|| { echo "make: crmhooks needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

kafka-start:
	scripts/kafka-local start

kafka-stop:
	scripts/kafka-local stop $(KAFKA_STOP_ARGS)

lint: venv
	$(BIN)/ruff check $(RUFF_CHECK_DIRS)
	$(BIN)/ruff format --check $(RUFF_FORMAT_DIRS)
	$(BIN)/mypy $(MYPY_DIRS)

test:
	bash scripts/test $(PYTEST_ARGS)

demo: venv
	bash scripts/demo

bench: venv
	bash scripts/bench

clean:
	-scripts/kafka-local stop
	-CRMHOOKS_KAFKA_DIR=var/kafka-test scripts/kafka-local stop
	rm -rf var .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist src/*.egg-info
	find . -path ./.venv -prune -o -path ./.cache -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
