# Two entry points on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
FMNIST  := /usr/share/datasets/fashion-mnist
STAMP   := $(VENV)/.installed

.PHONY: install data demo test lint format bench zoo clean

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP) data

# The embedded default dataset comes from Debian's package dataset-fashion-mnist.
data:
	@bash scripts/install-data.sh $(FMNIST)

demo: install
	$(BIN)/vitcompress demo

test: install lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# Retrain the shipped models from scratch (hours on 2 CPU cores): scripts/train-zoo.sh.
zoo: install
	VC=$(BIN)/vitcompress bash scripts/train-zoo.sh

bench: install
	$(BIN)/python benchmarks/run.py --append
	$(BIN)/python benchmarks/int8_exactness.py
	$(BIN)/python benchmarks/ort_profile.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
