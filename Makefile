# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test bench

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
	$(PY) -m pytest -q -n auto $(ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	touch $@

# make bench B=step_time ARGS="--models cnn": one benchmark (default: the report)
bench: $(VENV)/.bench-installed
	$(PY) -m benchmarks.$(B) $(ARGS)
