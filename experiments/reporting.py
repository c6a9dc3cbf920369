"""Writing benchmark rows as CSV and JSON; running a benchmark's worker in a fresh process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_worker(module: str, args: list[str]) -> dict | None:
    """``python -m <module> --worker <args>`` in a fresh process (glibc returning freed
    blocks of 64 KiB and more at once, see measure.py); its last stdout line as JSON, or
    None after printing the failure."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-m", module, "--worker", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        print(f"{module} {' '.join(args)} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_rows(rows: list[dict], out: Path) -> None:
    """``<out>.csv`` and ``<out>.json`` from a list of flat dicts with the same keys."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
