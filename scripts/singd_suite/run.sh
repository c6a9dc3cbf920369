#!/usr/bin/env bash
# singd 0.0.5's own tests (test/optim) and examples (docs/examples), run against stock
# singd or with singd.optim.optimizer.SINGD replaced by kfac_tn.SINGD.
#
#   bash scripts/singd_suite/run.sh SINGD_CHECKOUT MNIST_DIR {stock|kfac_tn} [pytest args...]
#
# SINGD_CHECKOUT: a checkout of https://github.com/f-dangel/singd at tag v0.0.5.
# MNIST_DIR: MNIST-format *-ubyte.gz files (e.g. Debian's dataset-fashion-mnist,
#   /usr/share/datasets/fashion-mnist); read by the torchvision stand-in next to this script.
# Needs: pip install memory_profiler codetiming (singd's test-only dependencies).
set -euo pipefail
checkout=$(realpath "$1"); mnist=$(realpath "$2"); which=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/docs"
cp -r "$checkout/test" "$work/test"
cp -r "$checkout/docs/examples" "$work/docs/examples"
if [ "$which" = kfac_tn ]; then
  grep -rl "from singd.optim.optimizer import SINGD" "$work/test" "$work/docs/examples" \
    | xargs sed -i 's/^from singd.optim.optimizer import SINGD$/from kfac_tn import SINGD/'
elif [ "$which" != stock ]; then
  echo "third argument: stock or kfac_tn" >&2; exit 2
fi
cd "$work"
# OMP_NUM_THREADS=1: torch's CPU float16 conv1d (Toeplitz structures) hangs with threads
export OMP_NUM_THREADS=1 KFAC_TN_MNIST_DIR="$mnist" PYTHONPATH="$here:$work${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest -q -p no:cacheprovider test/optim test/test_examples.py "$@"
