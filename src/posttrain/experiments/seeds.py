"""Conclusions across seeds: the study rerun under other seeds as DVC experiments, and one table of them.

    python -m posttrain seeds run --seeds 1 2      # one `dvc exp run` per seed (base.seed), in turn
    python -m posttrain seeds run --seeds 1 2 3 4 --gpus 0,1 --gpus 2,3   # two at a time (`experiments.grid`)
    python -m posttrain seeds table                # metrics/seeds.md and metrics/seeds.json

`run` queues nothing in the background: each seed is `dvc exp run --temp -n seed<k> -S base.seed=<k>`, run in
a temporary copy, so DVC keeps its granularity (the prepared data is shared; every stage after it reruns) and
the workspace is left alone. `table` reads the report's paired comparisons (``metrics/report_compare.json``)
of the workspace's committed result and of every experiment named ``seed<k>`` run with the same code and
params (the seed aside; others are named and left out), and, for each comparison the
report makes (each model against the baseline, each against SFTe), gives the delta per seed, its mean and
standard deviation, and a verdict: significant in every seed (Holm-adjusted p < 0.05, same sign), in none,
or mixed, which is the flag that a conclusion flips with the seed.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ALPHA = 0.05
REPORT_COMPARE = "metrics/report_compare.json"


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@dataclass(frozen=True)
class ExperimentRef:
    name: str
    rev: str  # the experiment's commit
    baseline: str  # the commit DVC filed it under (the workspace's HEAD when it ran)


def experiment_refs(repo: Path) -> list[ExperimentRef]:
    """Every DVC experiment of the repo, oldest first, as DVC stores a named one:
    ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``.
    """
    refs = git(
        "for-each-ref", "--sort=committerdate", "--format=%(refname) %(objectname)", "refs/exps", cwd=repo
    )
    found = []
    for line in filter(None, refs.split("\n")):
        ref, rev = line.split()
        parts = ref.split("/")  # refs, exps, sha[:2], sha[2:], name
        if len(parts) == 5:  # not DVC's own bookkeeping refs (refs/exps/exec/..., refs/exps/celery/...)
            found.append(ExperimentRef(parts[4], rev, parts[2] + parts[3]))
    return found


def recipe(repo: Path, rev: str) -> tuple[int, tuple[dict, dict]]:
    """A commit's ``base.seed``, and what else made its results: its params without the seed, and the hashes
    of the Python files its stages depend on (from its dvc.lock; none if it has none).
    """
    params = yaml.safe_load(git("show", f"{rev}:params.yaml", cwd=repo))
    seed = int(params["base"].pop("seed"))
    try:
        lock = yaml.safe_load(git("show", f"{rev}:dvc.lock", cwd=repo))
    except subprocess.CalledProcessError:
        lock = {}
    code = {
        d["path"]: d.get("md5")
        for stage in (lock or {}).get("stages", {}).values()
        for d in stage.get("deps", [])
        if d["path"].endswith(".py")
    }
    return seed, (params, code)


def seed_results(repo: Path) -> tuple[dict[int, dict], list[str]]:
    """base.seed -> the report's comparisons, for the workspace's HEAD and every ``seed<k>`` experiment of the
    same recipe.

    An experiment counts when its params, ``base.seed`` aside, and the code its stages ran (the Python deps'
    hashes in its dvc.lock) are HEAD's: a seed run with older code or other settings is another recipe's
    result, and taking it would mix recipes in one table. A later commit that touches neither (a README
    edit) keeps them. The others are returned as "seed<k> of <the commit DVC filed it under>", for the
    caller to name.
    """
    _, here = recipe(repo, "HEAD")
    revs = [("HEAD", "HEAD")]
    for e in experiment_refs(repo):
        if e.name.startswith("seed"):
            revs.append((e.rev, f"{e.name} of {e.baseline[:7]}"))
    found = {}
    stale = []
    for rev, label in revs:
        try:
            seed, made_by = recipe(repo, rev)
        except subprocess.CalledProcessError:
            continue  # an experiment that failed before its results
        if made_by != here:
            stale.append(label)
            continue
        try:
            compare = json.loads(git("show", f"{rev}:{REPORT_COMPARE}", cwd=repo))
        except subprocess.CalledProcessError:
            continue  # an experiment that failed before its report
        if "against" not in compare:
            continue  # a report of an older version
        found.setdefault(seed, compare["against"])
    return dict(sorted(found.items())), stale


def verdict(tests: list[dict]) -> str:
    """``all`` (significant with the same sign in every seed), ``none``, or ``mixed``."""
    significant = [t["p_holm"] < ALPHA for t in tests]
    signs = {math.copysign(1, t["delta"]) for t in tests}
    if all(significant) and len(signs) == 1:
        return "all"
    return "none" if not any(significant) else "mixed"


def seeds_table(results: dict[int, dict]) -> list[dict]:
    """One row per (against, model, metric) present in every seed: deltas per seed, mean, sd, verdict."""
    seeds = list(results)
    rows = []
    first = results[seeds[0]]
    for against, models in first.items():
        for model, entry in models.items():
            for metric in entry.get("vs_baseline", {}):
                tests = [
                    results[s].get(against, {}).get(model, {}).get("vs_baseline", {}).get(metric)
                    for s in seeds
                ]
                if any(t is None or t.get("delta") is None for t in tests):
                    continue
                deltas = [t["delta"] for t in tests]
                mean = sum(deltas) / len(deltas)
                sd = (
                    math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1))
                    if len(deltas) > 1
                    else 0.0
                )
                rows.append(
                    {
                        "against": against,
                        "model": model,
                        "metric": metric,
                        "deltas": dict(zip(seeds, deltas)),
                        "mean": mean,
                        "sd": sd,
                        "significant": verdict(tests),
                    }
                )
    return rows


def format_markdown(rows: list[dict], seeds: list[int]) -> str:
    lines = [
        f"# Conclusions across seeds ({len(seeds)} seeds: base.seed = {', '.join(map(str, seeds))})",
        "",
        "Paired deltas of the report (same test items), one column per seed; `all`: significant with the "
        f"same sign in every seed (Holm-adjusted p < {ALPHA}), `none`: in no seed, `mixed`: it flips.",
        "Made by `python -m posttrain seeds table`.",
        "",
    ]
    for against in dict.fromkeys(r["against"] for r in rows):
        lines += [
            f"## against {against}",
            "",
            "| model | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | significant |",
            "|---|---|" + "---:|" * len(seeds) + "---:|---|",
        ]
        for r in (r for r in rows if r["against"] == against):
            cells = " | ".join(f"{r['deltas'][s]:+.1f}" for s in seeds)
            spread = f"{r['mean']:+.1f} ± {r['sd']:.1f}"
            lines.append(f"| {r['model']} | {r['metric']} | {cells} | {spread} | {r['significant']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    from posttrain.core.io import write_json_atomic, write_text_atomic

    ap = argparse.ArgumentParser(prog="python -m posttrain seeds", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the study under each seed as a DVC experiment (in turn)")
    run.add_argument("--seeds", type=int, nargs="+", required=True, help="values of base.seed, e.g. 1 2")
    run.add_argument(
        "--gpus",
        action="append",
        metavar="I[,J...]",
        help="a GPU group per concurrent seed (repeat; see `python -m posttrain grid`); none: one at a time",
    )
    table = sub.add_parser(
        "table", help="the seeds table from the committed result and the seed<k> experiments"
    )
    table.add_argument("--out", default="metrics/seeds.md")
    table.add_argument("--json", default="metrics/seeds.json")
    args = ap.parse_args(argv)
    repo = Path.cwd()
    if args.command == "run":
        from posttrain.experiments.grid import Experiment, gpu_groups, run_experiments

        experiments = [Experiment(f"seed{s}", {"base.seed": str(s)}) for s in args.seeds]
        return run_experiments(experiments, gpu_groups(args.gpus), repo, repo / "params.yaml")
    results, stale = seed_results(repo)
    if stale:
        print(f"left out, another recipe (code or params): {', '.join(stale)}")
    if len(results) < 2:
        print(
            f"error: results for {len(results)} seed(s) of this recipe; "
            "run `python -m posttrain seeds run --seeds 1 2`"
        )
        return 1
    rows = seeds_table(results)
    write_text_atomic(args.out, format_markdown(rows, list(results)) + "\n")
    write_json_atomic(args.json, {"seeds": list(results), "rows": rows})
    print(f"{len(rows)} comparisons over seeds {list(results)} -> {args.out}, {args.json}")
    return 0
