"""How the stand-in LLaVA-1.5-7B samples (random weights): identical pairs, ended and empty answers.

    python bench/standin_samples.py --out bench/results/standin_samples_h100.json   # the 7B stand-in (GPU)
    python bench/standin_samples.py --out /tmp/s.json --shrink                        # 2-layer towers (CPU)

The e2e smoke needs preference pairs: two samples of a prompt that differ and both end within
max_new_tokens. This builds the stand-in as `posttrain.realscale.standin.write_llava` does (`build_llava`: the
tower led by the current token, learned tokens ×3, ends sampled at a set rate and EOS taught to follow them;
not saved), then samples `--prompts` generation prompts
of the e2e's parquet (the real template, 576 image tokens, random pixels) twice through
`posttrain.evaluate.generation.generate` at each temperature with top-p 0.9, and reports the share of
prompts whose two samples are identical, of samples that ended or are empty, of prompts that could be a
pair (differ, both ended), and of those the reference judge would not tie on (ROUGE-L).
"""

import argparse
import json
import subprocess
from pathlib import Path

import torch

from posttrain.evaluate.generation import generate
from posttrain.evaluate.metrics import rouge_l
from posttrain.models.architectures import load_config, shrink
from posttrain.models.template import encode_prompt
from posttrain.realscale.standin import build_llava, write_lrv_parquet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--temperatures", default="0.7,1.0")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--shrink", action="store_true", help="the 2-layer towers of the same config (CPU)")
    args = ap.parse_args()
    import pyarrow.parquet as pq

    device = "cpu" if args.shrink else "cuda"
    parquet = write_lrv_parquet(Path("/tmp/standin_samples.parquet"), 40, size=336)
    conversations = pq.read_table(parquet).column("conversations").to_pylist()
    texts = ["USER: ASSISTANT: " + " ".join(t["value"] for t in row) for row in conversations]
    config = load_config("llava-1.5-7b")
    if args.shrink:
        config = shrink(config)
    dtype = torch.float32 if args.shrink else torch.bfloat16
    model, tok, eos = build_llava(config, texts, device=device, dtype=dtype)
    model.eval()
    print(f"teach_eos: {eos}", flush=True)
    turns = [(row[0]["value"].split("\n", 1)[1], row[1]["value"]) for row in conversations]
    turns = (turns * (args.prompts // len(turns) + 1))[: args.prompts]
    tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    prompts = [encode_prompt(tok, [], q, tokens) for q, _ in turns]
    g = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    pixels = [torch.randn(3, size, size, generator=g).to(dtype) for _ in prompts]
    rows = []
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
        pairable = [(i, a, b) for i, ((a, ea), (b, eb)) in enumerate(pairs) if a != b and ea and eb]
        untied = sum(rouge_l(a, turns[i][1]) != rouge_l(b, turns[i][1]) for i, a, b in pairable)
        lengths = [len(tok.encode(t, add_special_tokens=False)) for pair in pairs for t, _ in pair]
        row = {
            "temperature": temperature,
            "prompts": len(pairs),
            "identical": identical,
            "samples_ended": sum(e for pair in pairs for _, e in pair),
            "samples_empty": sum(t == "" for pair in pairs for t, _ in pair),
            "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "pairable": len(pairable),
            "untied_by_reference": untied,
            "examples": [pairs[k][0][0][:80] for k in range(3)],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "host_cpu": next(
            (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"
        ),
        "torch": torch.__version__,
        "shrunk": args.shrink,
        "teach_eos": eos,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
