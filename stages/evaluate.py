"""Evaluate one model on the study test split and the retention split.

    dvc repro evaluate@base          # one model
    dvc repro evaluate_sft@sft1      # one SFT variant
    dvc repro evaluate evaluate_sft  # all of them

Writes per-item rows to data/eval/{study_test,pretrain_test}/<model>.jsonl, every metric (each with its 95%
CI and n, per-family accuracy, chance lines) to data/eval/metrics/<model>.json, and the headline metrics, the
model's row of `dvc metrics show`, to metrics/<model>.json.
"""

import argparse
from dataclasses import replace
from pathlib import Path

from posttrain.core.config import downstream_quantization, load_params
from posttrain.core.layout import model_dir
from posttrain.core.runtime import run_command, setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", required=True, help="model name: base, sfte, sfte_dpo or a key of sft.variants"
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--items", default="data/eval", help="per-item rows and every metric with its CI")
    ap.add_argument("--metrics", default="metrics", help="the headline metrics, the table's row")
    ap.add_argument("--logs", default="logs", help="wall times and token rates (not a DVC output)")
    args = ap.parse_args()

    params = load_params(args.params)
    device = setup(params.base.threads)
    # only now that the params are valid: torch and transformers take seconds to import
    from posttrain.core.distributed import is_main
    from posttrain.core.io import write_json_atomic
    from posttrain.evaluate.evaluation import evaluate_model, evaluation_batch, headline
    from posttrain.evaluate.generation import throughput
    from posttrain.models.loading import load_model

    # before any weight loads: batch_size auto sized to the GPU, an integer checked against it
    adapter = None if args.model == "base" else model_dir(args.model, args.models)
    batch = evaluation_batch(
        params.evaluate, model_dir("base", args.models), adapter, params.adapters.merge, Path(args.data)
    )
    model, processor = load_model(
        args.model, Path(args.models), device, downstream_quantization(params), merge=params.adapters.merge
    )
    metrics = evaluate_model(
        args.model,
        model,
        processor,
        Path(args.data),
        replace(params.evaluate, batch_size=batch),
        Path(args.items),
        Path(args.items) / "metrics" / f"{args.model}.json",
    )
    if not is_main():  # several processes (launch.processes): one writes
        return
    write_json_atomic(Path(args.logs) / f"evaluate_{args.model}.json", throughput())  # not a DVC output
    table = headline(metrics)
    write_json_atomic(Path(args.metrics) / f"{args.model}.json", table)  # the row of `dvc metrics show`
    print("  ".join(f"{k} {v:.2f}" for k, v in table.items() if v is not None))


if __name__ == "__main__":
    run_command(main)
