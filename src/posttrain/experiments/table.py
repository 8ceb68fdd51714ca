"""Studies as DVC experiments: what each experiment changed, and what its models learnt per study family.

    python -m posttrain grid --name steps -S sft.common.max_steps=400,800 --target evaluate_sft@sft1
    python -m posttrain table --model sft1          # the committed result and every experiment of HEAD
    python -m posttrain table steps-max_steps800 --md metrics/study.md --json metrics/study.json

A study is params plus `dvc exp run` (or `posttrain grid`, which runs one per combination); this reads them
back. The first row is the workspace's committed result (HEAD), the baseline; then every DVC experiment filed
under HEAD (as `dvc exp show` lists them), or the experiments named (under any commit), or with ``--all``
every experiment of the repo. For each: the params that differ from HEAD's, and per model (``--model``, or
every model evaluated there) each study family's accuracy with its Wilson 95% interval against the chance line
(the best constant answer on the test split), the families **beaten** (the whole interval above the chance
line), the headline metrics, and for ``sfte_dpo`` DPO's held-out reward accuracy.

Read at each experiment's commit: ``params.yaml``, ``dvc.lock`` and ``metrics/<model>.json`` from git, the
detailed ``data/eval/metrics/<model>.json`` (families, intervals, chance lines) and
``models/sfte_dpo/provenance.json`` from the DVC cache. A model whose outputs read here all have the
baseline's hashes in the experiment's ``dvc.lock`` is shown as ``as baseline``: the experiment did not change
it, or (with stage targets) did not rerun it, so its changed params do not describe it. Stage seconds are not
read: they go to the git-ignored ``logs/``, not to a DVC output.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from posttrain.data.charts import POOL_FAMILIES
from posttrain.experiments.seeds import experiment_refs, git

STUDY_FAMILIES = tuple(sorted(f for families in POOL_FAMILIES["study"].values() for f in families))
HEADLINE = ("relaxed_acc", "negative_acc", "retain_relaxed_acc", "retain_negative_acc", "bleu", "critic")
DETAILED = "data/eval/metrics/{model}.json"
DPO_PROVENANCE = "models/sfte_dpo/provenance.json"


def family_row(metrics: dict, families: tuple[str, ...] = STUDY_FAMILIES) -> dict:
    """One model's evaluation as the studies read it: per family its accuracy, Wilson interval low and chance
    line, the families beaten, and the headline metrics.

    Args:
        metrics: An evaluation's detailed metrics (``data/eval/metrics/<model>.json``: ``acc_<family>``,
            ``acc_<family>_ci_low``, ``chance_<family>``, ...); absent keys read as None.
        families: The families to read.

    Returns:
        ``families`` ({family: {acc, ci_low, chance}}), ``beats_chance`` (how many families' whole interval
        lies above their chance line; a family without either is never counted, touching is not clearing) and
        each of `HEADLINE`.
    """
    cells = {
        f: {
            "acc": metrics.get(f"acc_{f}"),
            "ci_low": metrics.get(f"acc_{f}_ci_low"),
            "chance": metrics.get(f"chance_{f}"),
        }
        for f in families
    }
    return {"families": cells, "beats_chance": beats_chance(cells), **{k: metrics.get(k) for k in HEADLINE}}


def beats_chance(families: dict) -> int:
    """Families whose Wilson interval's lower end lies above their chance line."""
    return sum(
        1
        for v in families.values()
        if v["ci_low"] is not None and v["chance"] is not None and v["ci_low"] > v["chance"]
    )


def num(x, digits: int = 0) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def family_cells(families: dict) -> list[str]:
    """``<family> <accuracy> [<interval low>] /<chance line>`` per family of a `family_row`."""
    return [f"{f} {num(v['acc'])} [{num(v['ci_low'])}] /{num(v['chance'])}" for f, v in families.items()]


def flatten(node, prefix: str = "") -> dict:
    """A params mapping as {dotted key: value}; lists, scalars and empty mappings are values."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_params(params: dict, baseline: dict) -> dict:
    """The dotted keys whose value differs from the baseline's (a key the baseline lacks included; one only
    the baseline has is given as None).
    """
    a, b = flatten(params), flatten(baseline)
    return {k: a.get(k) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def lock_hashes(lock: dict) -> dict[str, str]:
    """Every output's path -> md5 in a parsed dvc.lock."""
    return {
        o["path"]: o.get("md5")
        for stage in (lock or {}).get("stages", {}).values()
        for o in stage.get("outs", [])
    }


def dpo_heldout(provenance: dict) -> dict | None:
    """DPO's held-out figures of the last round (`dpo.heldout_fraction`): pairs, loss, reward accuracy and
    margin, from the adapter's provenance; None without a held-out share.
    """
    rounds = provenance.get("rounds") or []
    return (rounds[-1].get("training") or {}).get("heldout") if rounds else None


def read_revision(repo: Path, rev: str, models: list[str] | None, baseline_lock: dict[str, str]) -> dict:
    """Params, changed-model flags and every model's `family_row` at one commit (`read_runs`' rows)."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc_data.index import DataIndexError

    def from_git(path: str) -> str | None:
        try:
            return git("show", f"{rev}:{path}", cwd=repo)
        except subprocess.CalledProcessError:
            return None

    fs = DVCFileSystem(str(repo), rev=rev)

    def from_dvc(path: str) -> dict | None:
        try:
            return json.loads(fs.read_text(path))
        except (FileNotFoundError, DvcException, DataIndexError):  # not an output there, or not in the cache
            return None

    params = yaml.safe_load(from_git("params.yaml") or "{}") or {}
    hashes = lock_hashes(yaml.safe_load(from_git("dvc.lock") or "{}"))
    variants = list((params.get("sft") or {}).get("variants") or {})
    rows = {}
    for model in models or ["base", *variants, "sfte", "sfte_dpo"]:
        headline = from_git(f"metrics/{model}.json")
        detailed = from_dvc(DETAILED.format(model=model))
        if headline is None and detailed is None:
            continue  # not evaluated at this commit
        row = family_row({**json.loads(headline or "{}"), **(detailed or {})})
        row["detailed"] = detailed is not None
        read = [DETAILED.format(model=model), f"metrics/{model}.json"]
        if model == "sfte_dpo":
            row["dpo_heldout"] = dpo_heldout(from_dvc(DPO_PROVENANCE) or {})
            read.append(str(Path(DPO_PROVENANCE).parent))
        locked = [p for p in read if p in hashes]  # every output the row is read from, as dvc.lock hashes it
        row["as_baseline"] = bool(locked) and all(hashes[p] == baseline_lock.get(p) for p in locked)
        rows[model] = row
    return {"params": params, "lock": hashes, "models": rows}


def read_runs(repo: Path, names: list[str] = (), every: bool = False, models: list[str] | None = None):
    """The baseline (HEAD's committed result) and the experiments asked for, each a row.

    Args:
        repo: The git + DVC repository.
        names: Experiments to read by name, under any commit; none: those filed under HEAD (or `every`).
        every: Every experiment of the repo.
        models: The models to read; None: every model evaluated at each commit.

    Returns:
        Rows: name, rev, baseline (the commit DVC filed the experiment under; None for HEAD's row),
        ``params`` (the keys that differ from HEAD's params.yaml) and ``models`` (model -> `family_row` plus
        ``as_baseline``, ``detailed`` and, for sfte_dpo, ``dpo_heldout``).

    Raises:
        ValueError: a name that is no experiment.
    """
    head = git("rev-parse", "HEAD", cwd=repo).strip()
    refs = experiment_refs(repo)
    if names:
        missing = sorted(set(names) - {e.name for e in refs})
        if missing:
            listed = "see `dvc exp list --all-commits`"
            raise ValueError(f"no DVC experiment named {', '.join(missing)} ({listed})")
        refs = [e for e in refs if e.name in names]
    elif not every:
        refs = [e for e in refs if e.baseline == head]
    base = read_revision(repo, "HEAD", models, {})
    runs = [{"name": "HEAD", "rev": head, "baseline": None, "params": {}, "models": base["models"]}]
    for e in refs:
        r = read_revision(repo, e.rev, models, base["lock"])
        runs.append(
            {
                "name": e.name,
                "rev": e.rev,
                "baseline": e.baseline,
                "params": changed_params(r["params"], base["params"]),
                "models": r["models"],
            }
        )
    return runs


def _headline_cells(r: dict) -> str:
    beaten = f"{r['beats_chance']}/{len(r['families'])}" if r.get("detailed", True) else "—"
    cells = [
        f"beats {beaten}",
        f"rel {num(r['relaxed_acc'], 1)}",
        f"neg {num(r['negative_acc'], 1)}",
        f"retain {num(r['retain_relaxed_acc'], 1)}",
        f"bleu {num(r['bleu'], 1)}",
    ]
    h = r.get("dpo_heldout")
    if h:
        cells.append(f"dpo held-out {num(h.get('reward_accuracy'), 3)} ({h.get('pairs')} pairs)")
    return "  ".join(cells)


def _setting(run: dict) -> str:
    filed = "" if run["baseline"] is None else f" (of {run['baseline'][:7]})"
    changed = ", ".join(f"{k}={v}" for k, v in run["params"].items())
    return f"{run['name']}{filed}: " + (changed or ("committed result" if run["baseline"] is None else "="))


def format_text(runs: list[dict]) -> str:
    """One block per run: its setting, then a line per model."""
    out = []
    for run in runs:
        out.append(_setting(run))
        for model, r in run["models"].items():
            if r["as_baseline"]:
                out.append(f"  {model:<8} as baseline")
                continue
            cells = (
                "  ".join(family_cells(r["families"]))
                if r["detailed"]
                else f"(no {DETAILED.format(model=model)} in the DVC cache: `dvc pull` it)"
            )
            out.append(f"  {model:<8} {cells}  {_headline_cells(r)}")
    return "\n".join(out)


def format_markdown(runs: list[dict]) -> str:
    """One table, a row per (run, model): accuracy [interval low] per family, beaten ones bold, and a last
    row of the baseline's chance lines (a cell whose chance line differs from it names its own).
    """
    families = list(STUDY_FAMILIES)
    chance = {}
    for r in runs[0]["models"].values():
        chance = {f: v["chance"] for f, v in r["families"].items()}
        break
    head = ["experiment", "changed params", "model", *(f"`{f}`" for f in families)]
    head += ["beaten", "relaxed_acc", "negative_acc", "retention", "BLEU", "DPO held-out reward acc."]
    lines = [
        "# Studies: DVC experiments against the committed result",
        "",
        "Each family: accuracy [Wilson 95% interval low]; **bold**: the whole interval above the chance "
        "line. Made by `python -m posttrain table`.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|---|" + "---:|" * (len(head) - 3),
    ]
    for run in runs:
        setting = ", ".join(f"`{k}={v}`" for k, v in run["params"].items()) or (
            "committed result" if run["baseline"] is None else "="
        )
        for model, r in run["models"].items():
            cells = [run["name"], setting, model]
            if r["as_baseline"]:
                lines.append(_md_row(cells + ["as baseline"] + [""] * (len(head) - 4)))
                continue
            for f in families:
                v = r["families"].get(f, {"acc": None, "ci_low": None, "chance": None})
                acc = num(v["acc"])
                beaten = v["ci_low"] is not None and v["chance"] is not None and v["ci_low"] > v["chance"]
                cell = f"**{acc}** [{num(v['ci_low'])}]" if beaten else f"{acc} [{num(v['ci_low'])}]"
                if v["chance"] != chance.get(f):
                    cell += f" /{num(v['chance'], 1)}"
                cells.append(cell)
            h = r.get("dpo_heldout") or {}
            cells += [
                f"{r['beats_chance']}/{len(r['families'])}" if r["detailed"] else "—",
                num(r["relaxed_acc"], 1),
                num(r["negative_acc"], 1),
                num(r["retain_relaxed_acc"], 1),
                num(r["bleu"], 1),
                num(h.get("reward_accuracy"), 3),
            ]
            lines.append(_md_row(cells))
    chance_cells = [num(chance.get(f), 1) for f in families]
    lines.append(_md_row(["chance line", "", "", *chance_cells] + [""] * (len(head) - 3 - len(families))))
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    import argparse

    from posttrain.core.io import write_json_atomic, write_text_atomic

    ap = argparse.ArgumentParser(
        prog="python -m posttrain table",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("names", nargs="*", metavar="NAME", help="experiments to read (default: those of HEAD)")
    ap.add_argument("--all", action="store_true", help="every experiment of the repo, under any commit")
    ap.add_argument("--model", action="append", metavar="MODEL", help="a model to read (repeat); default all")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON here")
    ap.add_argument("--md", type=Path, metavar="FILE", help="also write the markdown table here")
    args = ap.parse_args(argv)
    try:
        runs = read_runs(Path.cwd(), args.names, args.all, args.model)
    except ValueError as e:
        print(f"error: {e}")
        return 1
    print(format_text(runs))
    if len(runs) == 1:
        print("no experiment to compare: run one with `dvc exp run` or `python -m posttrain grid`")
    if args.md:
        write_text_atomic(args.md, format_markdown(runs))
    if args.json:
        write_json_atomic(args.json, {"families": list(STUDY_FAMILIES), "runs": runs})
    return 0
