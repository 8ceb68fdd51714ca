"""Peak GPU memory of the stages' generation (`posttrain.generation.generate`) on llava-1.5-7b, one GPU.

    python bench/generation_memory.py --out bench/results/generation_memory_h100.json

Random bf16 weights of configs/llava-1.5-7b (nothing is read from disk); prompts shaped like the study's
(BOS, 576 image tokens, `--text-tokens` of text, all of one length), sampled `--samples` times each to
`--new-tokens` (random weights rarely emit the EOS, so every row runs to the end: the worst case). For each
batch: the peak allocated above the weights, what `posttrain.memory.estimate_generation` predicts for it,
or "oom" where CUDA ran out. The stages' memory check is calibrated on these rows (tests/test_memory.py).
"""

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch

from posttrain.architectures import build_random, load_config

IMAGE_TOKENS = 576


class _Tokenizer:
    """What `generate` reads of a tokenizer: pad and EOS ids and a decoder (the text is not looked at)."""

    pad_token_id = 0
    eos_token_id = 2

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line), "?")


def measure(
    model, config, *, batch: int, samples: int, new_tokens: int, text_tokens: int, cache: str
) -> dict:
    from posttrain import generation, memory

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
    row["estimate_gb"] = (
        round(
            memory.estimate_generation(
                config,
                prompts=batch,
                samples=samples,
                prompt_tokens=len(prompt),
                new_tokens=new_tokens,
                cache=cache,
            ).above_weights
            / 1e9,
            2,
        )
        if hasattr(memory, "estimate_generation")
        else None
    )
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        generation.generate(
            model,
            _Tokenizer(),
            pixels,
            [prompt] * batch,
            batch_size=batch,
            samples=samples,
            max_new_tokens=new_tokens,
            do_sample=samples > 1,
            cache=cache,
            seed=0,
        )
    except torch.OutOfMemoryError:
        row["peak_above_weights_gb"] = "oom"
        return row
    finally:
        generation._TOTALS.clear()
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
    ap.add_argument("--caches", default="static,dynamic")
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
