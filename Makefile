# `make demo` and `make test` each set up .venv (once) and then run.
#   make demo                   # train a small CNN on bundled MNIST, add ResMem, report, save, reload
#   make test                   # the default test suite (markers `slow` and `gpu` excluded)
# Variables: PYTHON (interpreter that creates the venv), VENV, TORCH (pip arguments installed first,
# so that pip does not pull a multi-GB CUDA build), EXTRAS, DEMO_ARGS, PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= cpu,demo,test
DEMO_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.resmem-install-stamp

.PHONY: demo test install clean-venv

demo: install
	$(BIN)/resmem demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-runs only when the venv is new or pyproject.toml / this Makefile changed.
$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	@echo "$(TORCH) .[$(EXTRAS)]" > $@

clean-venv:
	rm -rf $(VENV)
