"""Writing benchmark rows as CSV and JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_rows(rows: list[dict], out: Path) -> None:
    """``<out>.csv`` and ``<out>.json`` from a list of flat dicts with the same keys."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
