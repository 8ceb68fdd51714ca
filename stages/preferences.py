"""Self-critique preference pairs: SFTe answers each study-train prompt twice and a judge picks the better.

    dvc repro preferences

`preferences.judge`: self (the study's method), critic (LLaVA-Critic) or reference (ground truth). Writes
data/preferences/pairs.jsonl and metrics/preferences.json (pairs kept, order consistency, ties, identical
candidates, agreement with the ground-truth judge).
"""

import argparse
from dataclasses import replace
from pathlib import Path

from posttrain.core.config import downstream_quantization, load_params
from posttrain.core.io import atomic_dir, write_json_atomic, write_jsonl
from posttrain.core.layout import model_dir
from posttrain.core.runtime import run_command, setup
from posttrain.data.examples import load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--policy", default="sfte", help="the model that samples (and, for judge: self, judges)")
    ap.add_argument("--out", default="data/preferences")
    ap.add_argument("--metrics", default="metrics/preferences.json")
    ap.add_argument("--logs", default="logs", help="wall times and token rates (not a DVC output)")
    args = ap.parse_args()

    params = load_params(args.params)
    device = setup(params.base.threads)
    # only now that the params are valid: torch and transformers take seconds to import
    from posttrain.core.distributed import is_main
    from posttrain.evaluate.generation import throughput
    from posttrain.models.loading import load_model
    from posttrain.train.preferences import make_preferences, preference_batch

    examples = load_split(args.data, "study_train")
    if params.preferences.max_prompts:
        examples = examples[: params.preferences.max_prompts]
    # before any weight loads: batch_size auto sized to the GPU, an integer checked against it
    policy = None if args.policy == "base" else model_dir(args.policy, args.models)
    batch = preference_batch(
        params.preferences, model_dir("base", args.models), policy, params.adapters.merge, examples
    )
    model, processor = load_model(
        args.policy, Path(args.models), device, downstream_quantization(params), merge=params.adapters.merge
    )
    pairs, stats = make_preferences(
        model,
        processor,
        examples,
        Path(args.data),
        replace(params.preferences, batch_size=batch),
        params.evaluate.critic,
    )
    if not is_main():  # several processes (launch.processes): one writes
        return
    with atomic_dir(args.out) as tmp:
        write_jsonl(tmp / "pairs.jsonl", pairs)
    write_json_atomic(args.metrics, stats)
    write_json_atomic(Path(args.logs) / "preferences.json", throughput())  # rates: not a DVC output
    print(", ".join(f"{k} {v}" for k, v in stats.items()))


if __name__ == "__main__":
    run_command(main)
