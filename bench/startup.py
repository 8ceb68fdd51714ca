"""Where a model stage's start-up goes on the GPU: imports, and loading LLaVA-1.5-7B as the stages hold it.

    python bench/startup.py [--work /tmp/startup] [--out bench/results/startup_<card>.json]

Writes the stand-in LLaVA-1.5-7B (random weights, `posttrain.realscale.standin`) once, then times in this
process: importing torch, transformers + peft, the project's training and model modules (the HF Trainer), trl;
and loading the model twice as nf4 (QLoRA's base; the second load from a warm page cache) and once as bf16.
The e2e driver's start-up figure (a stage's wall time less its work) is what the study projection uses;
this says what it is made of.
"""

import argparse
import json
import time
from pathlib import Path

T: dict[str, float] = {}


def timed(label: str, start: float) -> float:
    now = time.perf_counter()
    T[label] = round(now - start, 1)
    return now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/startup")
    ap.add_argument("--out", help="default: bench/results/startup_<card>.json")
    args = ap.parse_args()

    t = time.perf_counter()
    import torch

    t = timed("import torch", t)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    t = timed("import transformers and peft", t)
    import posttrain.models.loading  # noqa: F401
    import posttrain.train.sft  # noqa: F401

    t = timed("import posttrain.train.sft and posttrain.models.loading (the HF Trainer)", t)
    import trl  # noqa: F401

    t = timed("import trl", t)
    from gpu import load_llava  # bench/gpu.py, beside this script

    from posttrain.realscale.e2e import write_standins

    work = Path(args.work)
    write_standins(work, False, "cuda", 24, critic=False)
    t = timed("write the stand-ins (not a stage's cost)", t)
    folder = str(work / "hub" / "llava-1.5-7b")
    for run in ("first", "second"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model = load_llava(folder, nf4=True)
        torch.cuda.synchronize()
        timed(f"load LLaVA-1.5-7B as nf4 ({run} load)", t)
        del model
        torch.cuda.empty_cache()
    t = time.perf_counter()
    model = load_llava(folder, nf4=False)
    torch.cuda.synchronize()
    timed("load LLaVA-1.5-7B as bf16", t)
    del model
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": T}
    print(json.dumps(result, indent=1))
    card = torch.cuda.get_device_name().split()[1].lower()
    Path(args.out or f"bench/results/startup_{card}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
