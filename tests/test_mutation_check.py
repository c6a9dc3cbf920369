"""scripts/mutation_check.py stays runnable: every mutant's fragment is in its file once
and its tests exist (the check itself runs by hand: it takes minutes)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from mutation_check import MUTANTS  # noqa: E402


def test_every_mutant_matches_the_code_once_and_names_existing_tests():
    for name, (file, fragment, replacement, tests) in MUTANTS.items():
        assert (ROOT / file).read_text().count(fragment) == 1, name
        assert fragment != replacement, name
        assert all((ROOT / t).is_file() for t in tests if t.startswith("tests/")), name
