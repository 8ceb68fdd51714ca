"""The self-judge's speed on the GPU: pairwise prompts judged per second, before and after computing each
prompt once for its three verdict sentences.

    python bench/judge.py [--prompts 256] [--batch 64] [--out bench/results/judge_h200.json]

LLaVA-1.5-7B's architecture with random weights (bf16), prompts shaped like the study's pairwise judge
prompt (BOS, 576 image tokens, 330-390 text tokens: the question and two answers of up to 128 tokens) and
three verdict continuations of 8 tokens. "before" scores the 3 whole sequences of every prompt with
`posttrain.evaluate.generation.answer_nll` (batch = the preset's `preferences.batch_size` sequences), as
`posttrain.train.preferences.self_verdicts` did; "after" runs `continuation_nll` (batch = that many prompts),
as it does now. Both results are compared: the sums must agree to bf16 rounding. `bench/gpu.py --judge` reads
the file into the study's projection.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from posttrain.evaluate.generation import answer_nll, continuation_nll
from posttrain.models.architectures import build_random, load_config
from posttrain.models.template import IGNORE_INDEX
from posttrain.realscale.standin import LLAVA_SPECIALS, standin_tokenizer

IMAGE_TOKENS = 576


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="the preset's preferences.batch_size")
    ap.add_argument("--out", help="default: bench/results/judge_<card>.json")
    args = ap.parse_args()

    config = load_config("llava-1.5-7b")
    model = build_random(config, dtype=torch.bfloat16, device="cuda", seed=0).eval()
    tokenizer = standin_tokenizer(
        ["a chart"], LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>"
    )
    g = torch.Generator().manual_seed(2)
    prompts = []
    for _ in range(args.prompts):
        n = int(torch.randint(330, 391, (1,), generator=g))
        prompts.append(
            [1] + [config.image_token_id] * IMAGE_TOKENS + torch.randint(3, 32000, (n,), generator=g).tolist()
        )
    verdicts = [torch.randint(3, 32000, (7,), generator=g).tolist() + [2] for _ in range(3)]  # 7 words + EOS
    pixels = [torch.randn(3, 336, 336, generator=g).to(torch.bfloat16) for _ in prompts]

    sequences, seq_pixels = [], []
    for p, px in zip(prompts, pixels):
        for v in verdicts:
            sequences.append((p + v, [IGNORE_INDEX] * len(p) + v))
            seq_pixels.append(px)

    def timed(fn):
        fn(4)  # warm-up on the first few
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(None)
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    def before(limit):
        n = 3 * (limit or len(prompts))
        return answer_nll(model, tokenizer, seq_pixels[:n], sequences[:n], batch_size=args.batch)[0]

    def after(limit):
        n = limit or len(prompts)
        return continuation_nll(model, tokenizer, pixels[:n], prompts[:n], verdicts, batch_size=args.batch)

    torch.cuda.reset_peak_memory_stats()
    old, old_s = timed(before)
    old_peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    new, new_s = timed(after)
    new_peak = torch.cuda.max_memory_allocated() / 1e9
    flat = torch.tensor([x for row in new for x in row])
    diff = (flat - torch.tensor(old)).abs() / torch.tensor(old).abs().clamp(min=1)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
        "prompts": len(prompts),
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "verdict_tokens": [len(v) for v in verdicts],
        "batch": args.batch,
        "before_whole_sequences": {
            "seconds": round(old_s, 2),
            "prompts_per_s": round(len(prompts) / old_s, 2),
            "peak_memory_gb": round(old_peak, 1),
        },
        "after_prompt_once": {
            "seconds": round(new_s, 2),
            "prompts_per_s": round(len(prompts) / new_s, 2),
            "peak_memory_gb": round(new_peak, 1),
        },
        "speedup": round(old_s / new_s, 2),
        "max_relative_difference": round(float(diff.max()), 5),
        "same_verdicts": sum(
            min(range(3), key=row.__getitem__) == min(range(3), key=old[3 * i : 3 * i + 3].__getitem__)
            for i, row in enumerate(new)
        ),
    }
    result["judge_prompts_per_s"] = result["after_prompt_once"]["prompts_per_s"]
    print(json.dumps(result, indent=2))
    card = torch.cuda.get_device_name().split()[1].lower()
    out = Path(args.out or f"bench/results/judge_{card}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
