#!/usr/bin/env bash
# The GPU checks in one command (under 10 minutes): the CUDA tests, then SGD / stock singd /
# kfac_tn SINGD on ResNet18 and VGG19 at batch 32 and 128 (configs/compare_gpu.yaml), then
# whether a T = 1 step captures in a CUDA graph (experiments/cuda_graph_probe.py), then the
# Fashion-MNIST benchmark's quick mode on the GPU (if the data is there).
# Usage: bash scripts/gpu_benchmarks.sh OUT_DIR
# Runs offline: torch (CUDA), singd, opt_einsum, pyyaml (and for the benchmark tqdm and
# matplotlib) must be importable; kfac_tn is
# used from this checkout.
set -u
out=${1:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$out/gpu.txt" 2>&1
timeout 80 python3 -m pytest -q tests/test_cuda.py 2>&1 | tail -20 | tee "$out/test_cuda.log"
timeout 200 python3 -m experiments.compare --config configs/compare_gpu.yaml --out "$out/compare_b32" 2>&1 | tee "$out/compare_b32.log"
timeout 160 python3 -m experiments.compare --config configs/compare_gpu.yaml batch_size=128 --out "$out/compare_b128" 2>&1 | tee "$out/compare_b128.log"
timeout 40 python3 -m experiments.cuda_graph_probe --out "$out/cuda_graph_probe" 2>&1 | tee "$out/cuda_graph_probe.log"
# Fashion-MNIST time to accuracy (docs/benchmark.md) when its idx files are here: the device
# machine has no package registry, so carry a copy (e.g. data/fashion-mnist, set FASHION_MNIST_DIR)
fmnist=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -d "$fmnist" ]; then
  timeout 90 python3 -m experiments.benchmark --problem fmnist_2c2d --quick --device cuda --budget 15 \
    --eval-every 5 --optimizers adam kfac_defaults singd_budget --data-dir "$fmnist" --out "$out/benchmark_fmnist_2c2d" 2>&1 | tail -12 | tee "$out/benchmark.log"
else
  echo "no Fashion-MNIST at $fmnist: benchmark skipped" | tee "$out/benchmark.log"
fi
rm -f "$out"/*.png "$out"/*.csv  # the JSON files hold every row
