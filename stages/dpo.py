"""SFTe_DPO: DPO on the ensemble adapter, its frozen copy as the reference.

    dvc repro dpo

Round 1 trains on data/preferences/pairs.jsonl; with `dpo.rounds` > 1 each further round samples from the
last round's model, judges and trains again. Writes the final adapter to models/sfte_dpo/ (earlier rounds
under models/sfte_dpo/rounds/) and the curves to dvclive/sfte_dpo/.
"""

import argparse
import shutil
from pathlib import Path

from posttrain.core.config import load_params
from posttrain.core.io import read_json, read_jsonl
from posttrain.core.runtime import run_command, setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--pairs", default="data/preferences")
    ap.add_argument("--preference-metrics", default="metrics/preferences.json")
    ap.add_argument("--out", default="models/sfte_dpo")
    ap.add_argument("--checkpoints", default="checkpoints/sfte_dpo")
    ap.add_argument("--live", default="dvclive/sfte_dpo", help="DVCLive folder; empty: no curves")
    args = ap.parse_args()

    params = load_params(args.params)
    setup(params.base.threads)
    # only now that the params are valid: torch and transformers take seconds to import
    from posttrain.core.distributed import is_main
    from posttrain.train.dpo import run_rounds

    models = Path(args.models)
    pairs = read_jsonl(Path(args.pairs) / "pairs.jsonl")
    stats = read_json(args.preference_metrics, produced_by="preferences")
    rounds = run_rounds(
        models / "base",
        models / "sfte",
        pairs,
        stats,
        Path(args.data),
        params,
        params.base.seed,
        Path(args.out),
        Path(args.checkpoints),
        Path(args.live) if args.live else None,
    )
    if not is_main():  # several processes (launch.processes): one cleans up and writes
        return
    shutil.rmtree(args.checkpoints, ignore_errors=True)  # the adapter is saved; they only served resuming
    for r in rounds:
        t = r["training"]
        print(
            f"round {r['round']}: {t['pairs']} pairs, {t['steps']} steps, "
            + ", ".join(f"{k} {v:.3f}" for k, v in t.items() if k.startswith("rewards/"))
        )


if __name__ == "__main__":
    run_command(main)
