"""Peak GPU memory of the stages' generation (`posttrain.evaluate.generation.generate`) on llava-1.5-7b, one
GPU.

    python bench/generation_memory.py --out bench/results/generation_memory_h100.json

Random bf16 weights of configs/llava-1.5-7b (nothing is read from disk); prompts shaped like the study's
(BOS, 576 image tokens, `--text-tokens` of text, all of one length), sampled `--samples` times each to
`--new-tokens` (random weights rarely emit the EOS, so every row runs to the end: the worst case). For each
batch: the peak allocated above the weights, what `posttrain.models.memory.estimate_generation` predicts for
it (its total less the weights: KV cache, activations, overhead), or "oom" where CUDA ran out. The stages'
memory check is calibrated on these rows (tests/test_generation_memory.py).
"""

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch

from posttrain.models.architectures import build_random, load_config

IMAGE_TOKENS = 576


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line), "?")


def measure(
    model, config, *, batch: int, samples: int, new_tokens: int, text_tokens: int, cache: str
) -> dict:
    from posttrain.evaluate import generation
    from posttrain.models import memory

    g = torch.Generator().manual_seed(0)
    prompt = (
        [1]
        + [config.image_token_id] * IMAGE_TOKENS
        + torch.randint(3, 32000, (text_tokens,), generator=g).tolist()
    )
    pixels = [torch.randn(3, 336, 336, generator=g).to(torch.bfloat16) for _ in range(batch)]
    row = {
        "batch": batch,
        "samples": samples,
        "new_tokens": new_tokens,
        "prompt_tokens": len(prompt),
        "cache": cache,
    }
    scoring = cache == "scoring"  # teacher-forced: the prompt plus `new_tokens` labelled answer tokens
    phase = (
        memory.Phase("scoring", 1, len(prompt) + new_tokens, 0, new_tokens + 1)
        if scoring
        else memory.Phase("bench", samples, len(prompt), new_tokens)
    )
    estimate = memory.estimate_generation(config, prompts=batch, phase=phase, weights=0.0)
    row["estimate_gb"] = round((estimate.total - estimate.weights) / 1e9, 2)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ids = torch.tensor([prompt] * batch, device="cuda")  # (B, T): one length, no padding
    mask = torch.ones_like(ids)
    pixel_values = torch.stack(pixels).to("cuda", torch.bfloat16)  # (B, 3, 336, 336)
    try:
        with torch.no_grad():
            if scoring:  # what `answer_nll` runs: the whole sequence, logits from the answer on
                answer = torch.randint(3, 32000, (batch, new_tokens), generator=g).to("cuda")
                model(
                    input_ids=torch.cat([ids, answer], 1),
                    attention_mask=torch.cat([mask, torch.ones_like(answer)], 1),
                    pixel_values=pixel_values,
                    logits_to_keep=new_tokens + 1,
                ).logits.float().log_softmax(-1)
            else:  # one batch of `generate`, the seeded sampler included
                kwargs = {
                    "do_sample": False,
                    "temperature": None,
                    "top_p": None,
                    "top_k": None,
                    "pad_token_id": 0,
                    "eos_token_id": 2,
                }
                if samples > 1:
                    keys = generation.row_keys(0, list(range(batch)), samples).to("cuda")
                    kwargs["logits_processor"] = generation.LogitsProcessorList(
                        [generation.SeededSampling(keys, ids.shape[1], temperature=0.7, top_p=0.9, top_k=50)]
                    )
                generation._generate_batch(
                    model,
                    ids,
                    mask,
                    pixel_values,
                    samples=samples,
                    max_new_tokens=new_tokens,
                    cache=cache,
                    generate_kwargs=kwargs,
                )
    except torch.OutOfMemoryError:
        row["peak_above_weights_gb"] = "oom"
        return row
    row["peak_above_weights_gb"] = round((torch.cuda.max_memory_allocated() - before) / 1e9, 2)
    row["reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="8,16,32,48,64", help="comma-separated prompts per batch")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--text-tokens", type=int, default=60)
    ap.add_argument("--caches", default="static,dynamic,scoring", help="scoring: teacher-forced, no cache")
    args = ap.parse_args()
    config = load_config("llava-1.5-7b")
    model = build_random(config, dtype=torch.bfloat16, device="cuda", seed=0).eval()
    result = {
        "device": torch.cuda.get_device_name(),
        "capacity_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 2),
        "host_cpu": cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "weights_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
        "rows": [],
    }
    for cache in args.caches.split(","):
        for b in map(int, args.batches.split(",")):
            row = measure(
                model,
                config,
                batch=b,
                samples=args.samples,
                new_tokens=args.new_tokens,
                text_tokens=args.text_tokens,
                cache=cache,
            )
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
