"""Mutation check: plausible one-line bugs, each of which some test must catch.

    python scripts/mutation_check.py [--only NAME ...] [--out docs/results/mutation_check.json]

Each mutant replaces one exact line fragment of a source file (the check fails loudly if
the fragment is gone: update the mutant with the code), runs the tests named for it
(``pytest -x -q``) and restores the file, whatever happens. A mutant whose tests still pass
has *survived*: a test is missing. Exit status 1 if any survived. About 3 minutes on 2 cores.
Run it on a clean work tree (it edits files in place, one at a time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (file, fragment, replacement, pytest arguments)
MUTANTS = {
    "diagonal bank momentum weight": (
        "kfac_tn/optim/diagonal_bank.py", "m.add_(self.momenta, alpha=alpha1)", "m.add_(self.momenta, alpha=1 - alpha1)",
        ["tests/optim/test_singd.py", "-k", "trajectory and diagonal"]),
    "sharded summed loss averaged": (
        "kfac_tn/optim/singd.py", "reduce_to_owners(grads, average=averaged_loss)", "reduce_to_owners(grads, average=True)",
        ["tests/optim/test_distributed.py", "-k", "sum_shard_singd"]),
    "step() writes into .grad": (
        "kfac_tn/optim/singd.py", "steps.append(p.grad.clone())", "steps.append(p.grad)",
        ["tests/optim/test_singd.py", "-k", "grad_as_it_was"]),
    "KFAC running average weights": (
        "kfac_tn/optim/kfac_update.py", "take = torch.where(first, on, on * (1 - ema_decay))",
        "take = torch.where(first, on, on * ema_decay)", ["tests/optim/test_kfac_update.py", "tests/optim/test_kfac.py"]),
    "π damping on the wrong factor": (
        "kfac_tn/optim/kfac_update.py", "return root * pi, root / pi", "return root / pi, root * pi",
        ["tests/optim/test_kfac_update.py"]),
    "block size off by one": (
        "kfac_tn/optim/factor_blocks.py", "return n, ceil(dim / n)", "return n, ceil(dim / n) + 1",
        ["tests/optim/test_factor_blocks.py"]),
    "padding counted in π's trace": (
        "kfac_tn/optim/factor_blocks.py", "padding = factor.shape[1] * factor.shape[2] - dim", "padding = 0",
        ["tests/optim/test_factor_blocks.py"]),
    "G blocks of A's size": (
        "kfac_tn/optim/kfac.py", "G = padded_blocks(*grad_output_factor_blocks(module, grad_output, b_G,",
        "G = padded_blocks(*grad_output_factor_blocks(module, grad_output, b_A,", ["tests/optim/test_factor_blocks.py"]),
    "stale inverses of another method kept": (
        "kfac_tn/optim/kfac.py", "                del layer_state[key]", "                pass",
        ["tests/optim/test_kfac.py", "-k", "eigh_continues"]),
    "budget bound exclusive": (
        "kfac_tn/optim/structure_budget.py", "if max(dims) <= max_dense_dim:", "if max(dims) < max_dense_dim:",
        ["tests/optim/test_structure_budget.py"]),
    "a target reached only above it": (
        "experiments/benchmark.py", "(value >= target) if problem.metric", "(value > target) if problem.metric",
        ["tests/experiments/test_fashion_mnist.py", "-k", "summary"]),
    "validation image leaks into training": (
        "experiments/data.py", "valid, train = perm[:n_valid], perm[n_valid:]",
        "valid, train = perm[:n_valid], perm[n_valid - 1:]", ["tests/experiments/test_fashion_mnist.py", "-k", "split"]),
}


def run_mutant(path: Path, fragment: str, replacement: str, tests: list[str]) -> tuple[bool, float]:
    """``(killed, seconds)`` of one mutant; the file is restored afterwards."""
    original = path.read_text()
    if original.count(fragment) != 1:
        raise SystemExit(f"{path}: the fragment {fragment!r} occurs {original.count(fragment)} times (need 1): "
                         "update this mutant with the code.")
    start = time.perf_counter()
    try:
        path.write_text(original.replace(fragment, replacement))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(original)
    return proc.returncode != 0, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(MUTANTS), help="run these mutants only")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    for name in args.only or MUTANTS:
        file, fragment, replacement, tests = MUTANTS[name]
        killed, seconds = run_mutant(ROOT / file, fragment, replacement, tests)
        rows.append({"mutant": name, "file": file, "killed": killed, "seconds": round(seconds, 1)})
        print(f"{'killed  ' if killed else 'SURVIVED'} {name:40s} {file} ({seconds:.0f} s)", flush=True)
    survived = [r["mutant"] for r in rows if not r["killed"]]
    print(f"{len(rows) - len(survived)} of {len(rows)} mutants killed" + (f"; survived: {survived}" if survived else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
