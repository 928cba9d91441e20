# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test bench lint format docs check

B ?= report

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,demo]"
	touch $@

train: $(VENV)/.installed
	$(PY) -m nysact_optax.demo $(ARGS)

# One pytest worker per core (pytest-xdist): the suite is compile-bound.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --durations=25 $(ARGS)

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e ".[lint,docs]"
	touch $@

# Lint, format check and types (the same hooks as .pre-commit-config.yaml).
lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The documentation site, warnings as errors: docs/_build/html/index.html.
docs: $(VENV)/.dev-installed
	$(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html

# What CI runs: lint and types, the docs build, then the tests.
check: lint docs test

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	touch $@

# make bench B=step_time ARGS="--models cnn": one benchmark (default: the report)
bench: $(VENV)/.bench-installed
	$(PY) -m benchmarks.$(B) $(ARGS)
