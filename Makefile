# The two commands the README promises: `make run` and `make test`. Both set up a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.PHONY: setup data run test test-fast lint bench docs

# The venv is rebuilt only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian's dataset-fashion-mnist, and chromium for the MLflow UI test, when we may install them
# and they are missing.
data:
	@if { [ ! -f $(FASHION_MNIST) ] || [ ! -x /usr/bin/chromium ]; } && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist chromium; \
	fi

setup: $(VENV)/.installed data

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two tests at a time: the pipeline tests spend most of their time starting processes and waiting
# on them, so two halve the wall time on 2 cores. Tests sharing a module's fixture stay together
# (xdist groups) and the longest go first: tests/conftest.py derives both from the tests' own
# fixtures, `slow` marks and last run's times, and --no-loadscope-reorder keeps that order.
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

# Everything but the tests that run real pipelines, clusters and searches (`slow`): a minute.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python benchmarks/train_step.py

# The docs site into site/ (mkdocs.yml; the params reference and results pages are generated).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
