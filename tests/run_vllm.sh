#!/usr/bin/env bash
# The vLLM suite (`make test-vllm`): the tests marked `vllm`, in .venv-vllm, inside a private
# network namespace that has only loopback, so neither vLLM's usage statistics nor a hub
# lookup can leave the machine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-vllm/bin/python}
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}  # GiB of KV cache per engine
export MPLBACKEND=Agg
if ! unshare --net true 2>/dev/null || ! command -v ip >/dev/null; then
  echo "vLLM suite SKIPPED: it runs only inside a private network namespace" \
    "(unshare --net as root, and ip); none can be made here"
  exit 0
fi
case " $* " in  # both vLLM test files, unless the arguments name test files themselves
  *" tests/"*) ;;
  *) set -- tests/test_vllm.py tests/test_vllm_server.py "$@" ;;
esac
exec unshare --net sh -c 'ip link set lo up && exec "$0" -m pytest -q -m vllm --durations=8 "$@"' \
  "$PY" "$@"
