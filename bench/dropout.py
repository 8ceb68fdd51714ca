"""What LoRA's dropout costs in a CPU SFT step: PEFT's `nn.Dropout` against `SparseDropout`.

    python bench/dropout.py [--steps 20] [--json bench/results/dropout_<cpu>.json]

Needs the committed base (`dvc repro base` or `dvc pull`). Builds sft1's LoRA (params.yaml's rank, targets and
sft1's alpha and dropout) on models/base, then alternates the two dropouts over the same random batches of
the study train split (32 conversations, as the default) and prints, for each: the median forward + backward +
AdamW step in ms, and the share of the step's CPU time that torch's profiler gives to the dropouts' forwards
(every op inside them: the draws, the scatter, the multiply). The two run interleaved so a noisy machine
slows both alike.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import cpu_model  # noqa: E402

from posttrain.core.runtime import setup  # noqa: E402

setup(0)  # before torch loads: the pinned CPU float paths; main() sets the threads
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402


class Labelled(torch.nn.Module):
    """A dropout whose forward shows in the profiler as one ``lora_dropout`` event, whatever ops it runs."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with record_function("lora_dropout"):
            return self.layer(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per dropout")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--base", default=str(ROOT / "models/base"), help="the base stage's folder")
    ap.add_argument("--data", default=str(ROOT / "data/prepared"), help="the prepared folder")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from posttrain.core.config import load_params

    params = load_params(args.params)
    setup(params.base.threads)
    from peft import LoraConfig, get_peft_model

    from posttrain.data.examples import load_split
    from posttrain.models.family import LLAVA_15
    from posttrain.models.loading import load_base
    from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset
    from posttrain.train.dropout import SparseDropout
    from posttrain.train.trainer import answer_loss

    data = Path(args.data)
    model, processor, _ = load_base(Path(args.base), device="cpu", dtype=torch.float32)
    common, variant = params.sft.common, params.sft.variants["sft1"]
    lora = LoraConfig(
        r=common.rank,
        lora_alpha=variant.alpha,
        lora_dropout=variant.dropout,
        target_modules=LLAVA_15.lora_regex(common.target_modules),
    )
    torch.manual_seed(0)
    model = get_peft_model(model, lora).train()
    layers = [
        (m.lora_dropout, name) for m in model.modules() if hasattr(m, "lora_A") for name in m.lora_dropout
    ]
    kinds = {
        "dropout": [Labelled(torch.nn.Dropout(variant.dropout)) for _ in layers],
        "sparse": [Labelled(SparseDropout(variant.dropout)) for _ in layers],
    }
    dataset = TeacherForcedDataset(load_split(data, "study_train"), data, processor)
    collate = TeacherForcedCollator(processor.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [
        collate([dataset[i] for i in torch.randint(len(dataset), (32,), generator=g).tolist()])
        for _ in range(2)
    ]

    def use(kind: str) -> None:
        for (holder, name), layer in zip(layers, kinds[kind]):
            holder[name] = layer

    def step(batch: dict) -> float:
        inputs = dict(batch)
        labels, start = inputs.pop("labels"), inputs.pop("answer_start")
        t = time.perf_counter()
        loss, _ = answer_loss(model, inputs, labels, None, start)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t

    for kind in kinds:  # warm-up
        use(kind)
        step(batches[0])
    times = {kind: [] for kind in kinds}
    for i in range(args.steps):
        for kind in kinds:
            use(kind)
            times[kind].append(step(batches[i % 2]))
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "threads": params.base.threads,
        "dropout_p": variant.dropout,
        "lora_layers": len(layers),
        "batch_shape": list(batches[0]["input_ids"].shape),
        "steps": args.steps,
    }
    for kind in kinds:
        use(kind)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(3):
                step(batches[i % 2])
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        own = sum(e.cpu_time_total for e in events if e.key == "lora_dropout")  # its ops, inclusive
        result[kind] = {
            "median_step_ms": round(1000 * statistics.median(times[kind]), 1),
            "dropout_share_of_step_cpu": round(own / total, 3),
        }
        print(
            f"{kind:>8}: median step {result[kind]['median_step_ms']} ms over {args.steps}; "
            f"its dropout ops {100 * result[kind]['dropout_share_of_step_cpu']:.1f}% of the step's CPU time",
            flush=True,
        )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
