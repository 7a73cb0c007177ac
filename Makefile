# fl_app on a fresh machine: `make run` trains, `make test` runs the test suite.
# Both first make .venv (python3 -m venv), install the project into it when
# pyproject.toml changed, and make sure Fashion-MNIST is on disk.

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Extra arguments: `make run RUN_ARGS='--run-config "num-server-rounds=5"'`,
# `make test PYTEST_ARGS='tests/test_model.py -x'`.
RUN_ARGS ?=
PYTEST_ARGS ?=

# Commands run as if the venv were activated: `flwr run` starts `flower-superlink`
# from PATH, and that process must run the Python fl_app is installed in.
IN_VENV := PATH="$(BIN):$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)"
# This project's Flower connections (.flwr/config.toml) and no per-run `uv sync` of the
# app's dependencies: the SuperLink runs the app in .venv.
FLOWER_ENV := FLWR_HOME="$(CURDIR)/.flwr" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

FMNIST_FILE := train-images-idx3-ubyte.gz
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist

.PHONY: help run test test-jax test-fast test-faults lint stop install data

help:
	@echo "make run        train: a local Flower simulation with the default run config"
	@echo "make test       the full test suite (python -m pytest -q), then make test-jax, ~34 min on 2 cores"
	@echo "make test-jax   the Message-level client tests on Keras' JAX backend (KERAS_BACKEND=jax python -m pytest -q -m jax), ~1.5 min"
	@echo "make test-fast  the fast tier: pytest -m \"not e2e and not slow\" (no federation, no warm worker), ~3.5 min on 2 cores"
	@echo "make test-faults  what make test leaves out: fault rehearsals, attack comparisons, benchmark smoke runs, equivalence runs, a SecAgg+ resume, ~22 min"
	@echo "make lint       ruff check and ruff format --check"
	@echo "make stop       stop the local SuperLink that 'make run' left running"
	@echo "make install    only the setup: .venv with pip install -e \".[dev]\""

run: install data
	$(IN_VENV) $(FLOWER_ENV) $(BIN)/flwr run . --stream $(RUN_ARGS)

test: install data
	$(IN_VENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-jax

# The app must also train on Keras' JAX backend (GPU machines: pip install -e ".[gpu]").
test-jax: install data
	$(IN_VENV) KERAS_BACKEND=jax $(BIN)/python -m pytest -q -m jax

test-faults: install data
	$(IN_VENV) $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-fast: install data
	$(IN_VENV) $(BIN)/python -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

stop:
	$(IN_VENV) $(BIN)/fl-app local stop-superlink

install: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "fl_app needs Python >= 3.11: make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $@

# Fashion-MNIST: the Debian package's copy or Keras' cache; else install the package
# (root) or say what to run.
data:
	@if [ -f "$(FMNIST_SYSTEM)/$(FMNIST_FILE)" ] \
	   || [ -f "$$HOME/.keras/datasets/fashion-mnist/$(FMNIST_FILE)" ]; then \
	  exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Fashion-MNIST: apt-get install -y dataset-fashion-mnist"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist'" \
	       "(Debian/Ubuntu), or '$(VENV)/bin/python -c \"import keras;" \
	       "keras.datasets.fashion_mnist.load_data()\"' to download it, then make again." >&2; \
	  exit 1; \
	fi
