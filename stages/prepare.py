"""Build the example splits every later stage reads.

    dvc repro prepare

Embedded default: synthetic charts (pretrain and study pools, split by image). Real study: LRV Chart from
`lmms-lab/LLaVA-OneVision-Data` at a pinned revision, or a local parquet of that schema.
"""

import argparse
import time

from posttrain.core.config import load_params
from posttrain.core.runtime import run_command
from posttrain.data.prepare import prepare_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/prepared")
    args = ap.parse_args()

    params = load_params(args.params).prepare
    t0 = time.perf_counter()
    report = prepare_data(params, args.out)
    for name, split in report["splits"].items():
        print(
            f"{name:>15}: {split['examples']:>5} turns in {split['conversations']:>5} conversations, "
            f"{split['images']:>5} images, {split['negatives']:>4} negative"
        )
    load = report["load"]
    if load.get("duplicate_images"):
        print(f"{load['duplicate_images']} conversations share an image with an earlier one (kept together)")
    skipped = load.get("skipped") or {}
    if skipped:
        print("skipped rows:", ", ".join(f"{k}={v}" for k, v in skipped.items()))
    print(f"prepared {args.out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    run_command(main)
