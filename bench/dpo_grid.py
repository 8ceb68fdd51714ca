"""DPO calibration grid: preference-pair sets × DPO settings × seeds, several runs at a time on the CPU.

    python bench/dpo_grid.py OUT [--jobs 8] [--seeds 0 1 2] [--configs NAME ...] [--json FILE]

Needs the committed models (`dvc repro ensemble` or `dvc pull`): models/base, models/sfte, data/prepared.
Each pair set is made once by `stages/preferences.py` (params.yaml with `preferences` overrides), then
optionally filtered by the reference judge's ROUGE-L margin (pairs whose two answers are equally correct are
kept only when the chosen one's ROUGE-L is at least `rouge_margin` points higher). Each run is
`stages/dpo.py` on a pair set with `dpo` overrides and `base.seed` = the seed (which also draws the held-out
images), then `stages/evaluate.py` on the adapter. Prints one JSON line a run: the held-out pairs, loss,
reward accuracy and margin the DPO stage measured, and the adapter's headline metrics. Every process uses
`base.threads` threads: `--jobs` × threads should not exceed the cores.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def rouge_margin(margin: float):
    """Keeps a pair whose correctness differs, or whose ROUGE-L gap is at least `margin` points."""

    def keeps(example, pair: dict) -> bool:
        from posttrain.train.preferences import reference_key

        (c1, r1), (c2, r2) = (reference_key(example, pair[k]) for k in ("chosen", "rejected"))
        return c1 > c2 or r1 - r2 >= margin

    return keeps


def answerable(example, pair: dict) -> bool:
    """Keeps a pair whose question is answerable (not a negative)."""
    return not example.negative


# pair sets: preferences overrides, and an optional filter of the pairs (`filtered`): a ROUGE-L margin
# (points) between equally correct answers, or answerable questions only
PAIR_SETS = {
    "decisive": ({"keep": "decisive"}, None),
    "decisive_t0.4": ({"keep": "decisive", "temperature": 0.4}, None),
    "decisive_t1.0": ({"keep": "decisive", "temperature": 1.0}, None),
    "rouge10": ({"keep": "decisive"}, rouge_margin(10)),
    "rouge20": ({"keep": "decisive"}, rouge_margin(20)),
    "rouge30": ({"keep": "decisive"}, rouge_margin(30)),
    "correctness": ({"keep": "correctness"}, None),
    "correct_answerable": ({"keep": "correctness"}, answerable),  # no pair on a negative question
}
# run name -> (pair set, dpo overrides); each names its held-out fraction, as run for the README's table
CONFIGS = {
    "lr2e-4": ("decisive", {"heldout_fraction": 0.1}),
    "lr3e-4": ("decisive", {"learning_rate": 3e-4, "heldout_fraction": 0.1}),
    "lr2e-4_ep2": ("decisive", {"epochs": 2.0, "heldout_fraction": 0.1}),
    "lr1e-4_ep3": ("decisive", {"learning_rate": 1e-4, "epochs": 3.0, "heldout_fraction": 0.1}),
    "lr2e-4_b0.3": ("decisive", {"beta": 0.3, "heldout_fraction": 0.1}),
    "lr3e-4_sw0.3": ("decisive", {"learning_rate": 3e-4, "sft_weight": 0.3, "heldout_fraction": 0.1}),
    "lr2e-4_ipo": ("decisive", {"loss_type": "ipo", "heldout_fraction": 0.1}),
    "t0.4_lr2e-4": ("decisive_t0.4", {"heldout_fraction": 0.1}),
    "t0.4_lr3e-4": ("decisive_t0.4", {"learning_rate": 3e-4, "heldout_fraction": 0.1}),
    "t0.4_ep2": ("decisive_t0.4", {"epochs": 2.0, "heldout_fraction": 0.1}),
    "t1.0_lr2e-4": ("decisive_t1.0", {"heldout_fraction": 0.1}),
    "t1.0_lr3e-4": ("decisive_t1.0", {"learning_rate": 3e-4, "heldout_fraction": 0.1}),
    "t1.0_ep2": ("decisive_t1.0", {"epochs": 2.0, "heldout_fraction": 0.1}),
    "m10_lr2e-4": ("rouge10", {"heldout_fraction": 0.1}),
    "m20_lr2e-4": ("rouge20", {"heldout_fraction": 0.1}),
    "m30_lr2e-4": ("rouge30", {"heldout_fraction": 0.1}),
    "m20_lr3e-4": ("rouge20", {"learning_rate": 3e-4, "heldout_fraction": 0.1}),
    "m30_lr3e-4": ("rouge30", {"learning_rate": 3e-4, "heldout_fraction": 0.1}),
    "correct_lr3e-4_ep2_h0.1": (
        "correctness",
        {"learning_rate": 3e-4, "epochs": 2.0, "heldout_fraction": 0.1},
    ),
    "correct_lr1e-4_ep2": ("correctness", {"learning_rate": 1e-4, "epochs": 2.0, "heldout_fraction": 0.2}),
    "correct_lr2e-4_ep1": ("correctness", {"learning_rate": 2e-4, "heldout_fraction": 0.2}),
    "correct_lr2e-4_ep2": ("correctness", {"learning_rate": 2e-4, "epochs": 2.0, "heldout_fraction": 0.2}),
    "correct_lr3e-4_ep1": ("correctness", {"learning_rate": 3e-4, "heldout_fraction": 0.2}),
    "correct_lr3e-4_ep2": ("correctness", {"learning_rate": 3e-4, "epochs": 2.0, "heldout_fraction": 0.2}),
    "correct_answerable": ("correct_answerable", {"heldout_fraction": 0.2}),
    # iterative DPO: later rounds sample from the last round's model, so its over-declines become pairs
    "correct_r2": ("correctness", {"rounds": 2, "heldout_fraction": 0.2}),
    "correct_r3": ("correctness", {"rounds": 3, "heldout_fraction": 0.2}),
    "correct_r2_sw1": ("correctness", {"rounds": 2, "sft_weight": 1.0, "heldout_fraction": 0.2}),
}


def params_with(section: str, overrides: dict, seed: int | None = None) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p[section].update(overrides)
    if seed is not None:
        p["base"]["seed"] = seed
    return p


def filtered(src: Path, dst: Path, keeps) -> None:
    """Write the pairs of `src` that `keeps(example, pair)` to `dst`, with `src`'s statistics."""
    from posttrain.data.examples import load_split

    examples = {e.id: e for e in load_split(ROOT / "data/prepared", "study_train")}
    lines = (src / "pairs.jsonl").read_text().splitlines()
    kept = [line for line in lines if keeps(examples[(p := json.loads(line))["id"]], p)]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "pairs.jsonl").write_text("".join(f"{line}\n" for line in kept))
    (dst / "metrics.json").write_text((src / "metrics.json").read_text())


def make_pairs(out: Path, name: str) -> Path:
    overrides, keeps = PAIR_SETS[name]
    source = out / "pairs" / json.dumps(overrides, sort_keys=True).replace('"', "").replace(" ", "")
    if not (source / "pairs.jsonl").exists():
        source.mkdir(parents=True, exist_ok=True)
        (source / "params.yaml").write_text(yaml.safe_dump(params_with("preferences", overrides)))
        cmd = [
            sys.executable,
            "stages/preferences.py",
            "--params",
            str(source / "params.yaml"),
            "--out",
            str(source),
            "--metrics",
            str(source / "metrics.json"),
            "--logs",
            str(source / "logs"),
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    if keeps is None:
        return source
    dst = out / "pairs" / name
    if not (dst / "pairs.jsonl").exists():
        filtered(source, dst, keeps)
    return dst


def run(out: Path, name: str, seed: int, pairs: Path) -> dict:
    _, overrides = CONFIGS[name]
    d = out / f"{name}_s{seed}"
    models = d / "models"
    models.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(params_with("dpo", overrides, seed)))
    if not (models / "base").exists():
        os.symlink(ROOT / "models/base", models / "base")
    params = str(d / "params.yaml")
    dpo = subprocess.run(
        [
            sys.executable,
            "stages/dpo.py",
            "--params",
            params,
            "--pairs",
            str(pairs),
            "--preference-metrics",
            str(pairs / "metrics.json"),
            "--out",
            str(models / "sfte_dpo"),
            "--checkpoints",
            str(d / "ckpt"),
            "--live",
            "",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    (d / "dpo.log").write_text(dpo.stdout + dpo.stderr)
    result = {"config": name, "pairs": CONFIGS[name][0], "seed": seed, **overrides, "dpo_rc": dpo.returncode}
    # one line per round: the last is the final adapter's
    lines = re.findall(
        r"held-out pairs: (\d+), loss ([\d.]+), reward accuracy ([\d.]+), margin ([-\d.]+)", dpo.stdout
    )
    result["pairs_per_round"] = [int(n) for n in re.findall(r"DPO round \d+/\d+: (\d+) pairs", dpo.stdout)]
    result["heldout_reward_accuracy_per_round"] = [float(line[2]) for line in lines]
    if lines:
        m = (None, *lines[-1])
        result.update(
            heldout_pairs=int(m[1]),
            heldout_loss=float(m[2]),
            heldout_reward_accuracy=float(m[3]),
            heldout_margin=float(m[4]),
        )
    if dpo.returncode == 0:
        ev = subprocess.run(
            [
                sys.executable,
                "stages/evaluate.py",
                "--model",
                "sfte_dpo",
                "--params",
                params,
                "--models",
                str(models),
                "--items",
                str(d / "eval"),
                "--metrics",
                str(d / "metrics"),
                "--logs",
                str(d / "logs"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        (d / "eval.log").write_text(ev.stdout + ev.stderr)
        if ev.returncode == 0:
            result.update(json.loads((d / "metrics" / "sfte_dpo.json").read_text()))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="a scratch folder for pairs, adapters and logs")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME")
    ap.add_argument("--json", help="also write every run's figures here")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    sets = sorted({CONFIGS[c][0] for c in args.configs})
    with ThreadPoolExecutor(args.jobs) as pool:
        pairs = dict(zip(sets, pool.map(lambda s: make_pairs(out, s), sets)))
        runs = [(c, s) for s in args.seeds for c in args.configs]
        results = list(pool.map(lambda cs: run(out, cs[0], cs[1], pairs[CONFIGS[cs[0]][0]]), runs))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
