"""SFTe: the SFT variants combined into one adapter.

    dvc repro ensemble

Combines every variant of `sft.variants`, in params order, from models/sft/<variant>/. `ensemble.method: cat`
(default) is exactly the average of the variant models; `linear` is the study's naive A/B averaging, kept for
the ablation. Writes models/sfte/ as a single adapter that reloads as `default`.
"""

import argparse
from pathlib import Path

from posttrain.core.config import load_params
from posttrain.core.layout import model_dir
from posttrain.core.runtime import run_command, setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", default="models", help="the models root: base/ and sft/<variant>/")
    ap.add_argument("--out", default="models/sfte")
    args = ap.parse_args()

    params = load_params(args.params)
    setup(params.base.threads)
    # only now that the params are valid: torch and transformers take seconds to import
    from posttrain.train.ensemble import build_ensemble

    members = {name: model_dir(name, args.models) for name in params.sft.variants}
    summary = build_ensemble(model_dir("base", args.models), members, params.ensemble, Path(args.out))
    note = (
        "exact average of the members" if summary["exact_average"] else "NOT the average model (approximate)"
    )
    print(f"sfte: {summary['method']} of {', '.join(summary['members'])}, rank {summary['rank']}: {note}")


if __name__ == "__main__":
    run_command(main)
