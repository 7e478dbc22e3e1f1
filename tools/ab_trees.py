"""Bench two trees of mlx_foundry against each other, alternating, in one session.

    python tools/ab_trees.py e34e5f4 --only prefill batch4 --rounds 2
    python tools/ab_trees.py e34e5f4 HEAD --quick --only linear --out ab_out

Each tree is exported to a folder of its own (``git archive`` of a revision; ``WORKTREE``,
the default new tree, is the checkout as it is) and ``python -m mlx_foundry bench`` runs
with that folder first on ``PYTHONPATH``. Every run starts from a working directory that
holds neither tree: Python puts the working directory ahead of ``PYTHONPATH``, so a run
started from the repository root would time the checkout on both sides. Before it times
anything, each run checks which package it imports.

The trees alternate round by round (old, new, old, new, ...). ``--same-cases`` gives the
old tree the new tree's list of bench cases (``mlx_foundry/bench/cases.py``), so that a
case added since is timed on both. Prints one row per case (``ours`` of each round, and the
ratio of the medians, new / old) and, with ``--out``, writes each run's ``results.json``
and ``ab.json``.
"""

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "mlx_foundry"
WORKTREE = "WORKTREE"
CASES = os.path.join(PACKAGE, "bench", "cases.py")


def _git(cwd, *args, text=True):
    """``git -C cwd args...``'s output; a ``RuntimeError`` with git's message if it fails."""
    r = subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=text)
    if r.returncode:
        err = r.stderr if text else r.stderr.decode(errors="replace")
        raise RuntimeError(f"[ab_trees] git {' '.join(args)} failed: {err.strip()}")
    return r.stdout


def package_in_repo():
    """``(top, rel)``: the repository's top folder and the package's path inside it (the
    package next to this script's folder; the repository may hold more than this project)."""
    here = os.path.dirname(os.path.abspath(__file__))
    top = _git(here, "rev-parse", "--show-toplevel").strip()
    pkg = os.path.join(os.path.dirname(here), PACKAGE)
    return top, os.path.relpath(os.path.realpath(pkg), os.path.realpath(top))


def resolve(top, rev):
    """The commit ``rev`` names (``WORKTREE`` stays as it is)."""
    if rev == WORKTREE:
        return rev
    if rev.startswith("-"):
        raise ValueError(f"[ab_trees] A revision cannot start with '-' but got {rev!r}.")
    return _git(top, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()


def export(top, rel, rev, dest):
    """Put the package of ``rev`` (a commit, or ``WORKTREE``) under ``dest``; returns the
    folder to put on ``PYTHONPATH``."""
    os.makedirs(dest)
    tree = os.path.join(dest, os.path.dirname(rel))
    if rev == WORKTREE:
        shutil.copytree(os.path.join(top, rel), os.path.join(dest, rel),
                        ignore=shutil.ignore_patterns("__pycache__"))
        return tree
    tar = _git(top, "archive", "--format=tar", rev, "--", rel, text=False)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        # "data": no absolute paths, nothing outside dest, no links that leave it
        # (Python >= 3.12, and the backports).
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        t.extractall(dest, **kw)
    return tree


def _env(tree):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH")) if p)
    return env


def imported_from(tree, cwd):
    """The folder ``import mlx_foundry`` finds with ``tree`` on ``PYTHONPATH`` from ``cwd``."""
    code = f"import os, {PACKAGE}; print(os.path.dirname(os.path.dirname({PACKAGE}.__file__)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(tree),
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"[ab_trees] The run for {tree} cannot import {PACKAGE}: "
                           f"{r.stderr.strip()}")
    return r.stdout.strip()


def run_bench(tree, cwd, out_dir, bench_args):
    """One ``bench`` run of ``tree``; returns ``{case name: case dict}`` from its results."""
    found = imported_from(tree, cwd)
    if os.path.realpath(found) != os.path.realpath(tree):
        raise RuntimeError(f"[ab_trees] The run for {tree} imports {PACKAGE} from {found}.")
    cmd = [sys.executable, "-m", PACKAGE, "bench", "--out", out_dir, *bench_args]
    subprocess.run(cmd, cwd=cwd, env=_env(tree), check=True)
    with open(os.path.join(out_dir, "results.json")) as f:
        return {c["name"]: c for c in json.load(f)["cases"]}


def summarize(runs, labels):
    """Rows ``(name, op, shape, {label: [ours_us per round]}, new / old median ratio)``."""
    old, new = labels
    names = [n for n in runs[new][0] if all(n in r for rs in runs.values() for r in rs)]
    rows = []
    for n in names:
        case = runs[new][0][n]
        us = {lab: [r[n].get("ours_us") for r in runs[lab]] for lab in labels}
        ok = all(v is not None for vs in us.values() for v in vs)
        ratio = statistics.median(us[new]) / statistics.median(us[old]) if ok else None
        rows.append((n, case.get("op", ""), case.get("shape", ""), us, ratio))
    return rows


def _fmt(vs):
    return " / ".join("-" if v is None else f"{v:.1f}" for v in vs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="git revision of the old tree")
    p.add_argument("new", nargs="?", default=WORKTREE,
                   help=f"git revision of the new tree (default: {WORKTREE}, the checkout)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tree (default: 2)")
    p.add_argument("--only", nargs="*", default=[], help="passed to bench --only")
    p.add_argument("--quick", action="store_true", help="passed to bench")
    p.add_argument("--backend", choices=["metal", "cuda", "reference"], help="passed to bench")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="passed to bench")
    p.add_argument("--same-cases", action="store_true",
                   help=f"give the old tree the new tree's {CASES}")
    p.add_argument("--out", help="folder for every run's results.json and ab.json")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    bench_args = (["--only", *args.only] if args.only else []) + (
        ["--quick"] if args.quick else []) + (["--backend", args.backend] if args.backend else []) + (
        ["--dtype", args.dtype] if args.dtype else [])
    top, rel = package_in_repo()
    revs = [resolve(top, rev) for rev in (args.old, args.new)]
    labels = (f"old {args.old}", f"new {args.new}")
    with tempfile.TemporaryDirectory(prefix="ab_trees_") as tmp:
        trees = {}
        for lab, rev, sub in zip(labels, revs, ("old", "new")):
            trees[lab] = export(top, rel, rev, os.path.join(tmp, sub))
        if args.same_cases:
            shutil.copyfile(os.path.join(trees[labels[1]], CASES),
                            os.path.join(trees[labels[0]], CASES))
        neutral = os.path.join(tmp, "cwd")
        os.makedirs(neutral)
        out = os.path.abspath(args.out) if args.out else os.path.join(tmp, "out")
        runs = {lab: [] for lab in labels}
        for r in range(args.rounds):
            for lab, sub in zip(labels, ("old", "new")):
                print(f"== round {r + 1}: {lab}", flush=True)
                run_dir = os.path.join(out, f"{sub}_{r + 1}")
                runs[lab].append(run_bench(trees[lab], neutral, run_dir, bench_args))
    rows = summarize(runs, labels)
    print(f"\n{'case':34s} {labels[0] + ' us':>24s} {labels[1] + ' us':>24s} {'new/old':>8s}")
    for name, _, _, us, ratio in rows:
        r = "-" if ratio is None else f"{ratio:.3f}"
        print(f"{name:34s} {_fmt(us[labels[0]]):>24s} {_fmt(us[labels[1]]):>24s} {r:>8s}")
    if args.out:
        summary = {"old": args.old, "new": args.new, "rounds": args.rounds,
                   "bench_args": bench_args,
                   "cases": [{"name": n, "op": op, "shape": shape, "ours_us": us,
                              "new_over_old": ratio}
                             for n, op, shape, us, ratio in rows]}
        with open(os.path.join(out, "ab.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {os.path.join(out, 'ab.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
