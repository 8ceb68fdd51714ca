"""What merging the adapter into the base does to what DPO trained (issue 28, item 3).

    python bench/merge.py WORKDIR [--out bench/results/merge_h200.json]

WORKDIR is a finished `python -m posttrain e2e WORKDIR` run: on a GPU (nf4 downstream) its SFTe and
SFTe_DPO adapters on the LLaVA-1.5-7B stand-in; `e2e --shrink` on the CPU (full precision: a check of this
script). DPO trains (and its rounds evaluate) the adapter as a layer of
its own on the nf4 base. Each model is loaded three ways and teacher-forced on the study test answers:

- ``trained``: the nf4 base with the adapter as its own layer, as DPO trained it (the reference);
- ``layer``: `load_model(merge=False)`, the nf4 weights dequantized to bf16 once, the adapter its own layer;
- ``merged``: `load_model(merge=True)`, the same with the adapter merged into the bf16 weights.

The DPO change is logits(sfte_dpo) − logits(sfte) under the same loading. Printed per loading: how much of
the trained change it keeps (relative error and cosine against ``trained``'s change), and the decoding rate
of the evaluation's `generate` for ``layer`` and ``merged``.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nf4 import answer_logits  # noqa: E402

from posttrain.core.config import Quantization  # noqa: E402
from posttrain.data.examples import load_split  # noqa: E402
from posttrain.evaluate.generation import generate  # noqa: E402
from posttrain.models.images import load_pixels  # noqa: E402
from posttrain.models.loading import (  # noqa: E402
    base_family,
    image_token_count,
    load_base,
    load_model,
    quantization_config,
    trained_quantization,
)
from posttrain.models.template import encode_prompt  # noqa: E402

MODELS = ("sfte", "sfte_dpo")


def trained(models: Path, name: str, device: str, quantization: Quantization):
    """The base as DPO held it with the adapter as its own layer: DPO's policy (`posttrain.train.dpo`)."""
    from peft import PeftModel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, processor, _ = load_base(
        models / "base", device, dtype, quantization_config(quantization, base_family(models / "base"))
    )
    return PeftModel.from_pretrained(model, str(models / name)).eval(), processor


def change_kept(change: torch.Tensor, reference: torch.Tensor) -> dict:
    """How well `change` (answer positions × vocab) reproduces `reference`, the trained DPO change."""
    change, reference = change.double(), reference.double()
    return {
        "relative_error": round(float((change - reference).norm() / reference.norm()), 4),
        "cosine": round(
            float(torch.nn.functional.cosine_similarity(change.flatten(), reference.flatten(), 0)), 4
        ),
        "mean_abs_change": round(float(change.abs().mean()), 6),
    }


def decode_rate(model, processor, data: Path, examples, batch_size: int, max_new_tokens: int) -> dict:
    tok = processor.tokenizer
    n = image_token_count(processor)
    prompts = [encode_prompt(tok, e.history, e.question, n) for e in examples]
    pixel_map = load_pixels(processor, data, [e.image for e in examples])
    pixels = [pixel_map[e.image] for e in examples]
    generate(model, tok, pixels[:batch_size], prompts[:batch_size], batch_size=batch_size, max_new_tokens=8)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    t0 = time.perf_counter()
    out = generate(
        model, tok, pixels, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, with_ends=True
    )
    sync()
    seconds = time.perf_counter() - t0
    return {"prompts": len(prompts), "seconds": round(seconds, 2), "cut_at_limit": sum(not e for _, e in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench/results/merge_h200.json"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models, data = args.workdir / "models", args.workdir / "data" / "prepared"
    quantization = trained_quantization(models / "sfte_dpo", "dpo")
    examples = load_split(data, "study_test")
    result: dict = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "base_quantization": quantization.value,
        "host_cpu": subprocess.run(
            ["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True
        ).stdout.strip(),
        "torch": torch.__version__,
        "test_items": len(examples),
        "dpo_training": json.loads((models / "sfte_dpo" / "provenance.json").read_text())["rounds"][-1][
            "training"
        ],
    }
    logits: dict = {}
    # trained: one nf4 base holding both adapters, each active in turn
    model, processor = trained(models, MODELS[0], device, quantization)
    model.load_adapter(str(models / MODELS[1]), adapter_name=MODELS[1])
    for name in MODELS:
        model.set_adapter("default" if name == MODELS[0] else name)
        logits["trained", name] = torch.cat(answer_logits(model, processor, data, examples))  # (tokens, V)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    # layer and merged: one dequantized base (load_model's), both adapters as layers, then each merged into a
    # copy of the base weights in turn (restored exactly afterwards, not by unmerging in bf16)
    model, processor = load_model(MODELS[0], models, device, quantization, merge=False)
    model.load_adapter(str(models / MODELS[1]), adapter_name=MODELS[1])
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    rates = {}
    for name in MODELS:
        model.set_adapter("default" if name == MODELS[0] else name)
        logits["layer", name] = torch.cat(answer_logits(model, processor, data, examples))
        if name == "sfte_dpo":
            rates["layer"] = decode_rate(
                model, processor, data, examples, args.batch_size, args.max_new_tokens
            )
        model.merge_adapter()  # base weight + the active adapter's ΔW, rounded to bf16, as merge_and_unload
        logits["merged", name] = torch.cat(answer_logits(model, processor, data, examples))
        if name == "sfte_dpo":  # a merged LoRA layer runs its base layer alone, as merge_and_unload's model
            rates["merged"] = decode_rate(
                model, processor, data, examples, args.batch_size, args.max_new_tokens
            )
        model.unmerge_adapter()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in originals:
                    p.copy_(originals[n])
    loaders = ("trained", "layer", "merged")
    reference = logits["trained", "sfte_dpo"] - logits["trained", "sfte"]
    result["answer_tokens"] = int(reference.shape[0])
    result["dpo_change"] = {
        how: change_kept(logits[how, "sfte_dpo"] - logits[how, "sfte"], reference) for how in loaders
    }
    result["sfte_dpo_logit_gap_to_trained"] = {
        how: round(float((logits[how, "sfte_dpo"] - logits["trained", "sfte_dpo"]).abs().mean()), 6)
        for how in loaders
    }
    result["decode"] = {**rates, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
