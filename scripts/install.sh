#!/usr/bin/env bash
# Install kfac_tn with its test extras, keeping torch at the machine's 2.13.0 CPU build
# (anything newer, also pulled in by torchvision via backpack, is a multi-GB CUDA wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -c constraints.txt -e ".[test,experiments]"
