"""Mutation check of kfac_tn with mutmut 3 (driven by ``scripts/mutation.sh``; not part of CI).

mutmut mutates the modules ``[tool.mutmut] only_mutate`` names (pyproject.toml:
``kfac_tn/factors`` and ``kfac_tn/optim``), runs the tests that cover each mutated function and
calls a mutant *killed* when one of them fails. This script picks which mutants to run:

- ``--sample N --seed S``: a fixed random sample of N mutants over all mutated modules;
- ``--module kfac_tn/optim/kfac_update.py``: every mutant of one module;
- ``--since REF``: every mutant of the functions whose lines changed since the commit REF
  (``git diff REF``, uncommitted changes included);
- ``--names FILE``: the mutants a report (``report.json``'s ``"mutants"``) or a file of names
  (one per line) lists, e.g. a sample again after new tests: the same names even where the
  source changed elsewhere (a sample of a changed list of mutants is another sample).

It then prints the per-module table (mutants, killed, survived, equivalent, other) and the
survivors with their diffs, and writes ``<out>/report.json``. Mutants listed in
``scripts/mutation_equivalent.txt`` (``name  # reason``) count as equivalent; a name there is
tied to its function's current source (mutmut numbers the mutants of a function in order).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.txt"
_NO_SUCH_MUTANT = "kfac_tn.__mutation_sh_generate_only__"
_RESULT_LINE = re.compile(r"^\s*(\S+__mutmut_\d+): (.+)$")
#: tests whose optimizer code runs in spawned processes, where mutmut's coverage does not look
MULTIPROCESS_TESTS = ["tests/optim/test_distributed.py"]


def mutmut(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m mutmut ARGS`` in the repository root."""
    out = subprocess.PIPE if quiet else None
    proc = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, text=True,
                          stdout=out, stderr=subprocess.STDOUT if quiet else None)
    if check and proc.returncode != 0:
        sys.exit(f"mutation.sh: `mutmut {' '.join(args[:3])} ...` failed (exit {proc.returncode})"
                 + (f":\n{proc.stdout[-3000:]}" if quiet else ""))
    return proc


def generate() -> None:
    """Let mutmut write the mutants and collect its test statistics (cached in mutants/).

    mutmut has no generate-only command: a run filtered to a name that matches no mutant
    generates, collects the statistics, then stops at its filter (its exit code is ignored).
    """
    proc = mutmut("run", _NO_SUCH_MUTANT, check=False, quiet=True)
    if not (MUTANTS / "mutmut-stats.json").exists():
        sys.exit(f"mutation.sh: mutmut did not collect its test statistics:\n{proc.stdout[-3000:]}")


def all_mutants() -> dict[str, str]:
    """Every generated mutant's name -> status (``mutmut results --all true``)."""
    proc = mutmut("results", "--all", "true", quiet=True)
    found = {}
    for line in proc.stdout.splitlines():
        match = _RESULT_LINE.match(line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def module_of(name: str) -> str:
    """``kfac_tn.optim.kfac.xǁKFACǁstep__mutmut_3`` -> ``kfac_tn/optim/kfac.py``."""
    dotted = name.split(".x_")[0] if ".x_" in name else name.split(".xǁ")[0]
    return dotted.replace(".", "/") + ".py"


def function_of(name: str) -> str:
    """The function a mutant lives in: ``step`` of ``KFAC`` -> ``KFAC.step``."""
    tail = name.rsplit("__mutmut_", 1)[0].split(".")[-1]
    return tail[2:] if tail.startswith("x_") else ".".join(tail[2:].split("ǁ"))


def changed_functions(ref: str) -> set[tuple[str, str]]:
    """(module, ``Class.method`` or ``function``) whose lines changed since ``ref``."""
    diff = subprocess.run(["git", "diff", "-U0", ref, "--", "kfac_tn"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout
    lines: dict[str, set[int]] = defaultdict(set)
    path = None
    for line in diff.splitlines():
        if line.startswith("+++ "):
            path = line[6:] if line.startswith("+++ b/") else None
        elif line.startswith("@@") and path:
            start, _, count = line.split("+", 1)[1].split(" ", 1)[0].partition(",")
            first, n = int(start), int(count or 1)
            lines[path].update(range(first, first + max(n, 1)))
    touched = set()
    for path, numbers in lines.items():
        tree = ast.parse((ROOT / path).read_text())
        for qualified, node in _functions(tree):
            if numbers & set(range(node.lineno, node.end_lineno + 1)):
                touched.add((path, qualified))
    return touched


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


@functools.cache
def diff(name: str) -> str:
    """The mutant's diff (``mutmut show``, its status line dropped)."""
    return mutmut("show", name, check=False, quiet=True).stdout.split("\n", 1)[-1].rstrip()


def check_multiprocess(names: list[str], timeout: float = 900.0) -> dict[str, str]:
    """Status of mutants mutmut found no covering test for, from the multi-process tests.

    Code that runs only in processes the tests spawn (the gloo ranks of the distributed
    tests) is invisible to mutmut's coverage, so it reports "no tests". The mutant is
    switched on the way mutmut does (``MUTANT_UNDER_TEST``, inherited by the ranks) and
    ``MULTIPROCESS_TESTS`` run in mutmut's copy: a failure kills it.
    """
    found = {}
    for name in names:
        env = {**os.environ, "MUTANT_UNDER_TEST": name}
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly",
                                   "-p", "no:cacheprovider", *MULTIPROCESS_TESTS], cwd=MUTANTS, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            found[name] = "killed" if proc.returncode == 1 else "survived" if proc.returncode == 0 else \
                f"no tests (pytest exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            found[name] = "killed"  # a hang (mutmut calls it a timeout, and a kill)
        print(f"mutation.sh: {name}: {found[name]} (multi-process tests)", flush=True)
    return found


def read_equivalent() -> dict[str, str]:
    """``scripts/mutation_equivalent.txt``: mutant name -> why it cannot change behaviour."""
    found = {}
    for line in EQUIVALENT.read_text().splitlines() if EQUIVALENT.exists() else []:
        name, _, reason = line.partition("#")
        if name.strip():
            found[name.strip()] = reason.strip()
    return found


def select(names: list[str], args: argparse.Namespace) -> list[str]:
    """The mutants this run checks (sorted, so a seed always names the same ones)."""
    names = sorted(names)
    if args.module:
        module = str(Path(args.module).as_posix())
        chosen = [n for n in names if module_of(n) == module]
        if not chosen:
            sys.exit(f"mutation.sh: no mutants in {module}; is it under [tool.mutmut] only_mutate?")
        return chosen
    if args.names:
        text = args.names.read_text()
        wanted = json.loads(text)["mutants"] if args.names.suffix == ".json" else text.split()
        missing = sorted(set(wanted) - set(names))
        if missing:
            print(f"mutation.sh: {len(missing)} listed mutants no longer exist (their functions changed), "
                  f"e.g. {missing[0]}")
        return sorted(set(wanted) & set(names))
    if args.since:
        touched = changed_functions(args.since)
        return [n for n in names if (module_of(n), function_of(n)) in touched]
    return sorted(random.Random(args.seed).sample(names, min(args.sample, len(names))))


def report(chosen: list[str], args: argparse.Namespace, status: dict[str, str]) -> dict:
    """Print the per-module table and the survivors' diffs; return the report (``status``:
    :func:`all_mutants`', with those :func:`check_multiprocess` found)."""
    equivalent = read_equivalent()
    table: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    for name in chosen:
        state = status.get(name, "not checked")
        kind = ("equivalent" if name in equivalent and state != "killed" else
                state if state in ("killed", "survived") else "other")
        table[module_of(name)][kind] += 1
        table[module_of(name)]["mutants"] += 1
        if kind in ("survived", "other"):
            survivors.append((name, state))
    columns = ("mutants", "killed", "survived", "equivalent", "other")
    total = sum(table.values(), Counter())
    print(f"\n{'module':44s}" + "".join(f"{c:>11s}" for c in columns))
    for module in sorted(table):
        print(f"{module:44s}" + "".join(f"{table[module][c]:11d}" for c in columns))
    print(f"{'all':44s}" + "".join(f"{total[c]:11d}" for c in columns))
    scored = total["killed"] + total["survived"] + total["other"]
    score = total["killed"] / scored if scored else float("nan")
    print(f"\nkilled {total['killed']} of {scored} non-equivalent mutants: {score:.1%}"
          " ('other': no covering test, timeout, crash of the run itself or not checked)")
    for name, state in survivors:
        print(f"\n# {name}: {state}")
        print(diff(name))
    result = {"selection": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "score": score, "totals": dict(total),
              "modules": {m: dict(c) for m, c in sorted(table.items())},
              "survivors": [{"name": n, "status": s} for n, s in survivors],
              "equivalent": {n: equivalent[n] for n in chosen if n in equivalent}, "mutants": chosen}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"\nreport: {args.out / 'report.json'}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sample", type=int, default=250, help="random mutants to check (250)")
    mode.add_argument("--module", help="check every mutant of this file, e.g. kfac_tn/optim/kfac.py")
    mode.add_argument("--since", metavar="REF", help="check the functions changed since REF")
    mode.add_argument("--names", type=Path, metavar="FILE", help="check the mutants a report.json or a list names")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (0)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel mutants (all cores)")
    parser.add_argument("--recheck", action="store_true", help="re-run the multi-process checks")
    parser.add_argument("--report-only", action="store_true", help="report the last results")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "mutation")
    args = parser.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        parser.error("--sample must be a positive number of mutants")
    if not args.report_only:
        generate()
    status = all_mutants()
    chosen = select(list(status), args)
    if not chosen:
        print("mutation.sh: no mutated function changed; nothing to check")
        return
    print(f"mutation.sh: {len(chosen)} mutants")
    # killed stays killed while the source is unchanged (mutmut forgets the results of a
    # function whose source changed): the rest, survivors included, is checked (again)
    pending = [n for n in chosen if status.get(n) != "killed"]
    if not args.report_only and pending:
        jobs = ["--max-children", str(args.jobs)] if args.jobs else []
        print(f"mutation.sh: checking {len(pending)} (the others were killed before)")
        # mutmut exits 0 when it checked them all, whatever their status
        mutmut("run", *jobs, *pending)
        status = all_mutants()
    args.out = args.out.resolve()
    # kept by name and diff: a changed function's mutants get new numbers
    cache_path = args.out / "multiprocess.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    uncovered = {n: diff(n) for n in chosen if status.get(n) == "no tests"}
    stale = [n for n, d in uncovered.items() if args.recheck or cache.get(n, {}).get("diff") != d]
    if stale and not args.report_only:
        for name, found in check_multiprocess(stale).items():
            cache[name] = {"diff": uncovered[name], "status": found}
        args.out.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1, ensure_ascii=False) + "\n")
    extra = {n: cache[n]["status"] for n, d in uncovered.items() if cache.get(n, {}).get("diff") == d}
    report(chosen, args, {**status, **extra})


if __name__ == "__main__":
    main()
