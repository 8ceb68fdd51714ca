"""The base model: the "already post-trained" VLM every later stage starts from.

    dvc repro base

Embedded default (`base.model: tiny`): build a tiny LLaVA and train it from scratch on the synthetic
pretrain pool, so it genuinely reads charts. Real study (`base.model: hub`): record the hub id and pinned
revision instead of copying 14 GB into the DVC cache, once its config.json names a model family posttrain
describes (`posttrain.models.family`): another fails here, before any weight is read.
"""

import argparse
import shutil
from pathlib import Path

from posttrain.core.config import ModelKind, load_params, to_dict
from posttrain.core.io import atomic_dir, write_json_atomic
from posttrain.core.runtime import run_command, setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--out", default="models/base")
    ap.add_argument("--checkpoints", default="checkpoints/base")
    ap.add_argument("--live", default="dvclive/base")
    ap.add_argument("--logs", default="logs", help="wall times and resumes (not a DVC output)")
    args = ap.parse_args()

    params = load_params(args.params).base
    setup(params.threads)
    # only now that the params are valid: torch and transformers take seconds to import
    from posttrain.models.loading import write_provenance
    from posttrain.train.base import train_tiny_base

    if params.model is ModelKind.HUB:
        from transformers import AutoConfig

        from posttrain.models.family import family_of

        family = family_of(AutoConfig.from_pretrained(params.hub_id, revision=params.revision or None))
        with atomic_dir(args.out) as tmp:
            write_provenance(
                tmp,
                kind="hub",
                hub_id=params.hub_id,
                revision=params.revision,
                family=family.name,
                produced_by="stages/base.py",
                params=to_dict(params),
            )
        if args.live:  # the stage's declared curves: none, since a hub base trains nothing here
            plots = Path(args.live) / "plots"
            shutil.rmtree(plots, ignore_errors=True)
            plots.mkdir(parents=True)
        print(f"base: {params.hub_id}@{params.revision} ({family.name}) recorded in {args.out}")
        return
    from posttrain.core.distributed import is_main

    summary = train_tiny_base(
        params,
        Path(args.data),
        Path(args.out),
        Path(args.checkpoints),
        Path(args.live) if args.live else None,
    )
    if not is_main():  # several processes (launch.processes): one cleans up and writes
        return
    shutil.rmtree(args.checkpoints, ignore_errors=True)  # the model is saved; they only served resuming
    write_json_atomic(Path(args.logs) / "base.json", summary)  # timings: outside every DVC output
    print(
        f"base: {summary['steps']} steps in {summary['train_seconds']:.0f}s, "
        f"final loss {summary['final_loss']:.4f} -> {args.out}"
    )


if __name__ == "__main__":
    run_command(main)
