# divscope — set-up, demos, tests and benchmarks. Every target bootstraps .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export MPLBACKEND ?= Agg

.PHONY: venv demo persona-demo test bench lint clean

venv: $(STAMP)

# torch is pinned first so that pip takes the CPU build on this machine, not the CUDA wheels.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) kl_demo.py

test: venv
	$(PY) -m ruff check src tests kl_demo.py benchmarks
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks.run

lint: venv
	$(PY) -m ruff check src tests kl_demo.py benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
