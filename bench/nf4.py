"""The base held in nf4 after SFT, as QLoRA trained on it: what it changes, and that SFTe stays the average.

    python bench/nf4.py [--models models] [--data data/prepared] [--out bench/results/nf4_h200.json]

CUDA only (bitsandbytes 4-bit). On the pipeline's own models (the tiny base and its adapters, from
`dvc repro`), loaded with the base in bf16 and in nf4 (`posttrain.models.loading.quantization_config`, the
settings QLoRA SFT uses):

1. **One adapter, two bases.** sft1's logits on the study test split, teacher-forced on the reference answers
   (the sequences of the test loss): the largest and mean logit gap, the mean KL(bf16 ‖ nf4) and the top-1
   agreement at the answer positions, and the test loss under each.
2. **The ensemble on the nf4 base is still the members' average.** SFTe (the `cat` adapter the pipeline built)
   against the four members active together at 1/4 scale each (`posttrain.train.ensemble.members_together`,
   the averaged delta computed without a combined adapter), on the same nf4 base; the gap between SFTe and a
   single member shows the size a failure would have.
3. **What it does to the table.** `evaluate_model` for sft1 and sfte with each base: the headline metrics.
"""

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from posttrain.core.config import Quantization, load_params
from posttrain.core.layout import model_dir
from posttrain.data.examples import load_split
from posttrain.evaluate.evaluation import evaluate_model
from posttrain.models.images import load_pixels
from posttrain.models.loading import base_family, image_token_count, load_base, quantization_config
from posttrain.models.template import IGNORE_INDEX, encode_conversation, pad_batch
from posttrain.train.ensemble import members_together

HOLDS = {"bf16": Quantization.NONE, "nf4": Quantization.NF4}
HEADLINE = ("loss", "bleu", "rouge_l", "critic", "relaxed_acc", "negative_acc", "retain_relaxed_acc")


def answer_logits(model, processor, data_dir: Path, examples, batch_size: int = 64) -> list[torch.Tensor]:
    """Per example, the fp32 logits (n_answer_tokens, vocab) that predict its reference answer and EOS."""
    tok = processor.tokenizer
    n_image = image_token_count(processor)
    pixels = load_pixels(processor, data_dir, [e.image for e in examples])
    embed = model.get_input_embeddings().weight  # its device and dtype (an nf4 base keeps them bf16)
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        seqs = [encode_conversation(tok, e.history, e.question, e.answer, n_image) for e in chunk]
        ids = pad_batch([s for s, _ in seqs], tok.pad_token_id, "right").to(embed.device)
        mask = pad_batch([[1] * len(s) for s, _ in seqs], 0, "right").to(embed.device)
        px = torch.stack([pixels[e.image] for e in chunk]).to(embed.device, embed.dtype)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits.float()
        for row, (_, labels) in enumerate(seqs):
            # the logits at t - 1 predict the token at t
            at = [t - 1 for t, lab in enumerate(labels) if lab != IGNORE_INDEX]
            out.append(logits[row, at].cpu())
    return out


def answer_targets(processor, examples) -> list[torch.Tensor]:
    n_image = image_token_count(processor)
    targets = []
    for e in examples:
        _, labels = encode_conversation(processor.tokenizer, e.history, e.question, e.answer, n_image)
        targets.append(torch.tensor([lab for lab in labels if lab != IGNORE_INDEX]))
    return targets


def gap(a: list[torch.Tensor], b: list[torch.Tensor], targets: list[torch.Tensor]) -> dict:
    """How far logits `b` are from `a` at the answer positions (a is the reference)."""
    la, lb = torch.cat(a), torch.cat(b)
    y = torch.cat(targets)
    pa, pb = la.log_softmax(-1), lb.log_softmax(-1)
    return {
        "answer_tokens": int(len(y)),
        "max_abs_logit_gap": round(float((la - lb).abs().max()), 5),
        "mean_abs_logit_gap": round(float((la - lb).abs().mean()), 5),
        "logit_std": round(float(la.std()), 4),
        "mean_kl": round(float((pa.exp() * (pa - pb)).sum(-1).mean()), 6),
        "top1_agreement": round(float((la.argmax(-1) == lb.argmax(-1)).float().mean()), 4),
        "test_loss_a": round(float(-pa.gather(1, y[:, None]).mean()), 4),
        "test_loss_b": round(float(-pb.gather(1, y[:, None]).mean()), 4),
    }


def base_with(models: Path, hold: Quantization):
    model, processor, _ = load_base(
        models / "base",
        device="cuda",
        dtype=torch.bfloat16,
        quantization_config=quantization_config(hold, base_family(models / "base")),
    )
    if hold is Quantization.NONE:
        model = model.cuda()
    return model, processor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--members", nargs="+", default=["sft1", "sft2", "sft3", "sft4"])
    ap.add_argument("--out", default="bench/results/nf4_h200.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/nf4.py needs a CUDA GPU (bitsandbytes nf4)")
    from peft import PeftModel

    models, data = Path(args.models), Path(args.data)
    params = load_params(args.params)
    examples = load_split(data, "study_test")
    result: dict = {
        "gpu": torch.cuda.get_device_name(),
        "host_cpu": subprocess.run(
            ["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True
        ).stdout.strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "models": str(models),
        "test_items": len(examples),
    }
    t0 = time.perf_counter()

    # 1. one adapter on the bf16 and the nf4 base
    logits = {}
    for name, hold in HOLDS.items():
        model, processor = base_with(models, hold)
        model = PeftModel.from_pretrained(model, str(model_dir(args.members[0], models))).eval()
        logits[name] = answer_logits(model, processor, data, examples)
        del model
    targets = answer_targets(processor, examples)
    result["one_adapter"] = {"adapter": args.members[0], **gap(logits["bf16"], logits["nf4"], targets)}
    print("sft1 bf16 vs nf4:", result["one_adapter"], flush=True)

    # 2. SFTe against its members active together, on each base
    member_dirs = {m: model_dir(m, models) for m in args.members}
    result["ensemble"] = {}
    for name, hold in HOLDS.items():
        model, processor = base_with(models, hold)
        ensemble = PeftModel.from_pretrained(model, str(models / "sfte")).eval()
        e_logits = answer_logits(ensemble, processor, data, examples)
        del ensemble, model
        model, _ = base_with(models, hold)
        together = members_together(model, member_dirs)
        t_logits = answer_logits(together, processor, data, examples)
        del together, model
        model, _ = base_with(models, hold)
        again = PeftModel.from_pretrained(model, str(models / "sfte")).eval()
        r_logits = answer_logits(again, processor, data, examples)
        del again, model
        single = logits[name]  # one member on the same base
        result["ensemble"][name] = {
            "sfte_vs_sfte_reloaded": gap(e_logits, r_logits, targets),  # the floor: same model, fresh load
            "sfte_vs_members_together": gap(e_logits, t_logits, targets),
            "sfte_vs_one_member": gap(e_logits, single, targets),
        }
        print(f"{name}: sfte vs members together", result["ensemble"][name]["sfte_vs_members_together"])

    # 3. the headline metrics with each base
    result["metrics"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in (args.members[0], "sfte"):
            for name, hold in HOLDS.items():
                # by hand: load_model refuses nf4 for these adapters, which trained on the fp32 tiny base
                model, processor = base_with(models, hold)
                model = PeftModel.from_pretrained(model, str(model_dir(model_name, models))).eval()
                items, metrics_file = Path(tmp) / name, Path(tmp) / "m.json"
                m = evaluate_model(model_name, model, processor, data, params.evaluate, items, metrics_file)
                result["metrics"].setdefault(model_name, {})[name] = {
                    k: round(m[k], 3) for k in HEADLINE if m.get(k) is not None
                }
                del model
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["metrics"], indent=2))


if __name__ == "__main__":
    main()
