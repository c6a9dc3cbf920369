#!/usr/bin/env bash
# Install kfac_tn (editable) with its test and experiment extras: CI and CPU-only machines.
#
# torch: an importable torch (>= 2.2, any build: CPU, CUDA, ROCm) is kept as it is. Without
# one, the CPU-only build is installed from PyTorch's CPU index (TORCH_SPEC, default
# torch==2.13.0; TORCH_INDEX_URL to use another index, e.g. a CUDA one). Every later install
# is constrained to the torch present, so no dependency (backpack pulls torchvision) can
# replace it with a multi-GB CUDA build.
#
# --with-fashion-mnist: also install Debian's dataset-fashion-mnist (the real data of
# python -m experiments.benchmark; apt-get, as root or through sudo). Tests never need it.
set -euo pipefail
if [ "${1:-}" = "--with-fashion-mnist" ]; then
  apt=(apt-get); [ "$(id -u)" -ne 0 ] && apt=(sudo apt-get)
  "${apt[@]}" update -qq && "${apt[@]}" install -y -qq dataset-fashion-mnist
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/install.sh [--with-fashion-mnist]" >&2; exit 2
fi
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" \
    --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
pinned=$(mktemp)
trap 'rm -f "$pinned"' EXIT
python -c "import torch; print('torch==' + torch.__version__)" > "$pinned"
echo "kfac_tn: installing against $(cat "$pinned")"
python -m pip install --quiet -c "$pinned" -e ".[test,experiments]"
