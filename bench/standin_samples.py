"""How the stand-in LLaVA-1.5-7B samples (random weights): identical pairs and ended answers by EOS factor.

    python bench/standin_samples.py --out bench/results/standin_samples_h100.json

The e2e smoke needs pairs: two samples of a prompt that differ and both end within max_new_tokens.
This builds the 7B stand-in as `posttrain.realscale.standin.write_llava` does (learned tokens ×3, not
saved), then for each EOS factor and temperature samples `--prompts` prompts (BOS, 576 image tokens, 40
learned text tokens, random pixels) twice through `posttrain.evaluate.generation.generate` at top-p 0.9 and
reports the share of prompts whose two samples are identical, of samples that ended, and of prompts that
could be a pair (differ, both ended).
"""

import argparse
import json
import subprocess
from pathlib import Path

import torch

from posttrain.evaluate.generation import generate
from posttrain.models.architectures import build_random, load_config
from posttrain.realscale.standin import (
    LLAVA_SPECIALS,
    emphasise_learned_tokens,
    learned_token_ids,
    standin_tokenizer,
    write_lrv_parquet,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=38)
    ap.add_argument("--factors", default="1,2,3,4,6")
    ap.add_argument("--temperatures", default="0.7,1.0")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    import pyarrow.parquet as pq

    parquet = write_lrv_parquet(Path("/tmp/standin_samples.parquet"), 24, size=336)
    texts = [
        "USER: ASSISTANT: " + " ".join(t["value"] for t in row)
        for row in pq.read_table(parquet).column("conversations").to_pylist()
    ]
    tok = standin_tokenizer(texts, LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    config = load_config("llava-1.5-7b")
    model = build_random(config, dtype=torch.bfloat16, device="cuda", seed=0).eval()
    learned = learned_token_ids(tok)
    emphasise_learned_tokens(model, learned)
    head = model.get_output_embeddings().weight
    eos_row = head[tok.eos_token_id].clone()
    g = torch.Generator().manual_seed(0)
    prompts = [
        [1]
        + [config.image_token_id] * 576
        + [learned[i] for i in torch.randint(len(learned), (40,), generator=g).tolist()]
        for _ in range(args.prompts)
    ]
    pixels = [torch.randn(3, 336, 336, generator=g).to(torch.bfloat16) for _ in range(args.prompts)]
    rows = []
    for factor in map(float, args.factors.split(",")):
        with torch.no_grad():
            head[tok.eos_token_id] = eos_row * factor
        for temperature in map(float, args.temperatures.split(",")):
            pairs = generate(
                model,
                tok,
                pixels,
                prompts,
                batch_size=args.prompts,
                max_new_tokens=args.new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=0.9,
                samples=2,
                with_ends=True,
            )
            identical = sum(a == b for (a, _), (b, _) in pairs)
            ended = sum(e for pair in pairs for _, e in pair)
            pairable = sum(a != b and ea and eb for (a, ea), (b, eb) in pairs)
            empty = sum(t == "" for pair in pairs for t, _ in pair)
            row = {
                "eos_factor": factor,
                "temperature": temperature,
                "prompts": len(pairs),
                "identical": identical,
                "samples_ended": ended,
                "samples_empty": empty,
                "pairable": pairable,
                "example": pairs[0][0][0][:80],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {
        "device": torch.cuda.get_device_name(),
        "host_cpu": next(
            (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"
        ),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
