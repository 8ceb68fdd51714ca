"""SFTe: the SFT variants combined into one adapter.

    dvc repro ensemble

`ensemble.method: cat` (default) is exactly the average of the variant models; `linear` is the study's naive
A/B averaging, kept for the ablation. Writes models/sfte/ as a single adapter that reloads as `default`.
"""

import argparse
from pathlib import Path

import torch

from posttrain.config import load_params
from posttrain.ensembling import build_ensemble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", default="models")
    ap.add_argument("--out", default="models/sfte")
    args = ap.parse_args()

    params = load_params(args.params)
    if params.base.threads:
        torch.set_num_threads(params.base.threads)
    models = Path(args.models)
    members = {name: models / name for name in params.sft.variants}
    summary = build_ensemble(models / "base", members, params.ensemble, Path(args.out))
    note = "exact average of the members" if summary["exact_average"] else "NOT the average model (approximate)"
    print(f"sfte: {summary['method']} of {', '.join(summary['members'])}, rank {summary['rank']}: {note}")


if __name__ == "__main__":
    main()
