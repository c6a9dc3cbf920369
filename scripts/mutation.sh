#!/usr/bin/env bash
# Mutation check of kfac_tn/factors and kfac_tn/optim with mutmut 3 (not part of CI: too slow).
#
#   bash scripts/mutation.sh                      # a fixed random sample of 250 mutants (seed 0)
#   bash scripts/mutation.sh --sample 400 --seed 1
#   bash scripts/mutation.sh --module kfac_tn/optim/kfac_update.py
#   bash scripts/mutation.sh --since origin/main  # the functions a change touches
#   bash scripts/mutation.sh --names results/mutation/report.json  # the last run's mutants again
#   bash scripts/mutation.sh --report-only        # the table of the last results
#
# Run it before a change to the optimizer core or the factors lands (docs/development.md says
# how to read its report). mutmut works in ./mutants (a mutated copy, cached between runs);
# the report goes to results/mutation/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import mutmut" 2>/dev/null; then
  pinned=$(mktemp)
  trap 'rm -f "$pinned"' EXIT
  python -c "import torch; print('torch==' + torch.__version__)" > "$pinned"
  python -m pip install --quiet -c "$pinned" -e ".[mutation]"
fi
# one thread per worker: mutmut runs a worker per core
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python scripts/mutation.py "$@"
