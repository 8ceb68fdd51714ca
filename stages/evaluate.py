"""Evaluate one model on the study test split and the retention split.

    dvc repro evaluate@base          # one model
    dvc repro evaluate               # all of them

Writes per-item rows to data/eval/{study_test,pretrain_test}/<model>.jsonl and the flat metrics
(each with a 95% bootstrap CI) to metrics/<model>.json.
"""

import argparse
from pathlib import Path

from posttrain.config import downstream_quantization, load_params
from posttrain.runtime import run_command, setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", required=True, help="model name: base, or an adapter folder's name under models/"
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--items", default="data/eval")
    ap.add_argument("--metrics", default="metrics")
    args = ap.parse_args()

    params = load_params(args.params)
    device = setup(params.base.threads)
    # only now that the params are valid: torch and transformers take seconds to import
    from posttrain.evaluation import evaluate_model
    from posttrain.models import load_model

    model, processor = load_model(args.model, Path(args.models), device, downstream_quantization(params))
    metrics = evaluate_model(
        args.model,
        model,
        processor,
        Path(args.data),
        params.evaluate,
        Path(args.items),
        Path(args.metrics) / f"{args.model}.json",
    )
    shown = ("relaxed_acc", "negative_acc", "critic", "rouge_l", "bleu", "loss")
    print("  ".join(f"{k} {metrics[k]:.2f}" for k in shown if metrics.get(k) is not None))
    print(
        "  ".join(
            f"retain_{k} {metrics['retain_' + k]:.2f}"
            for k in shown
            if metrics.get("retain_" + k) is not None
        )
    )


if __name__ == "__main__":
    run_command(main)
