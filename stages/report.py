"""The comparison of every evaluated model: metrics/report.md, report.png, curves.png and examples.html.

    dvc repro report

The models, in table order, are the pipeline's (`posttrain.core.layout.pipeline_models`): base, every key of
`sft.variants` in params order, sfte and sfte_dpo.
"""

import argparse
import json
from pathlib import Path

from posttrain.core.config import load_params
from posttrain.core.layout import model_dir, pipeline_models
from posttrain.core.runtime import run_command


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--items", default="data/eval")
    ap.add_argument("--metrics", default="metrics")
    ap.add_argument(
        "--models-dir", default="models", help="for the DPO rounds in models/sfte_dpo/provenance.json"
    )
    ap.add_argument("--live", default="dvclive", help="DVCLive root: the training curves; empty: none")
    args = ap.parse_args()

    params = load_params(args.params)
    # only now that the params are valid: matplotlib is slow
    from posttrain.report.report import ReportInputs, build_report

    models = pipeline_models(params)
    prefs = Path(args.metrics) / "preferences.json"
    dpo_prov = model_dir("sfte_dpo", args.models_dir) / "provenance.json"
    inputs = ReportInputs(
        models,
        metrics_dir=Path(args.metrics),
        items_dir=Path(args.items),
        data_dir=Path(args.data),
        live_dir=Path(args.live) if args.live else None,
    )
    build_report(
        inputs,
        params.report,
        critic_is_model=params.evaluate.critic.kind.needs_model,
        ensemble_method=params.ensemble.method.value,
        preferences=json.loads(prefs.read_text()) if prefs.exists() else None,
        dpo_rounds=json.loads(dpo_prov.read_text()).get("rounds") if dpo_prov.exists() else None,
        judge=params.preferences.judge.value,
    )
    print(f"wrote {args.metrics}/report.md, report.png, examples.html for {', '.join(models)}")


if __name__ == "__main__":
    run_command(main)
