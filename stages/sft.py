"""One LoRA/QLoRA SFT variant of the base model on the study train split.

    dvc repro sft@sft1        # one variant
    dvc repro sft             # all of them

Reads `sft.common` and `sft.variants.<name>`; writes the adapter to models/sft/<name>/ (adapter_config.json,
adapter_model.safetensors, provenance.json) and the curves to dvclive/sft/<name>/. A run killed mid-training
resumes from checkpoints/<name>/ when rerun.
"""

import argparse
import shutil
from pathlib import Path

from posttrain.core.config import ParamsError, load_params
from posttrain.core.io import write_json_atomic
from posttrain.core.layout import live_dir, model_dir
from posttrain.core.runtime import run_command, setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True, help="a key of sft.variants, e.g. sft1")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models", help="the models root: reads base/, writes sft/<variant>/")
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--live", default="dvclive", help="DVCLive root; empty: no curves")
    ap.add_argument("--logs", default="logs", help="wall times and resumes (not a DVC output)")
    args = ap.parse_args()

    params = load_params(args.params)
    if args.variant not in params.sft.variants:
        known = ", ".join(sorted(params.sft.variants))
        raise ParamsError([f"--variant {args.variant}: not a key of sft.variants ({known})"], args.params)
    setup(params.base.threads)
    # only now that the params are valid: torch and transformers take seconds to import
    from posttrain.core.distributed import is_main
    from posttrain.train.sft import train_sft_variant

    checkpoints = Path(args.checkpoints) / args.variant
    out = model_dir(args.variant, args.models)
    summary = train_sft_variant(
        args.variant,
        params.sft.common,
        params.sft.variants[args.variant],
        params.base.seed,
        Path(args.models) / "base",
        Path(args.data),
        out,
        checkpoints,
        live_dir(args.variant, args.live) if args.live else None,
    )
    if not is_main():  # several processes (launch.processes): one cleans up and writes
        return
    shutil.rmtree(checkpoints, ignore_errors=True)
    write_json_atomic(Path(args.logs) / f"{args.variant}.json", summary)  # timings: outside every DVC output
    print(
        f"{args.variant}: {summary['steps']} steps in {summary['train_seconds']:.0f}s, "
        f"final loss {summary['final_loss']:.4f} -> {out}"
    )


if __name__ == "__main__":
    run_command(main)
