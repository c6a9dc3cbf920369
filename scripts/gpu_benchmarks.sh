#!/usr/bin/env bash
# The benchmarks on a CUDA machine, in order of importance, each part bounded in time.
# Usage: bash scripts/gpu_benchmarks.sh OUT_DIR   (singd/einconv must be importable)
set -u
out=${1:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$out/gpu.txt" 2>&1
timeout 240 python3 experiments/compare.py --config configs/compare_goals_gpu.yaml --out "$out/compare_goals_gpu" 2>&1 | tee "$out/compare_goals_gpu.log"
timeout 150 python3 experiments/compare.py --config configs/compare_full.yaml --out "$out/compare_full" 2>&1 | tee "$out/compare_full.log"
timeout 120 python3 experiments/bench_factors.py --cases 3x3 resnet18_l1 convnext_stem --out "$out/bench_factors" 2>&1 | tee "$out/bench_factors.log"
rm -f "$out"/*.png "$out"/*.csv  # at most 8 files come back; the JSON holds every row
