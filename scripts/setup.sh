#!/usr/bin/env bash
# Create .venv and install aligntools with its test extras.
#
# PyTorch is installed first and pinned (2.13.0) only when the environment has none:
# on this project's CPU machines that takes a local CPU wheel; elsewhere pip takes the
# default build for the platform (CUDA on Linux). A torch you installed yourself
# (e.g. a specific CUDA build) is kept: pyproject only asks for torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q --disable-pip-version-check -e ".[test,gguf,tensorboard,plot,lora]"
# TRL only for the test that compares our DPO/IPO/hinge losses with TRL's on identical log-probs
# (its own dependencies are ours already; --no-deps keeps it from changing them).
python -m pip install -q --disable-pip-version-check --no-deps "trl==1.16.0"
python -c "import torch, transformers, aligndata; print(f'installed: torch {torch.__version__}, transformers {transformers.__version__}, aligndata {aligndata.__version__}')"
