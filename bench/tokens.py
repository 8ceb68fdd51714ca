"""Tokens per SFT epoch: one sequence per turn (before) against one sequence per conversation (after).

    python bench/tokens.py [--rows 1776] [--out bench/results/tokens.json]

Built on the stand-in LRV Chart parquet (`posttrain.realscale.standin.write_lrv_parquet`: synthetic 336 px
charts as LRV-schema conversations with follow-ups, LRV declines and duplicate images) read through the real
loader, and the stand-in LLaVA-1.5 tokenizer with LLaVA-1.5's 576 image tokens. Per turn, every turn repeats
the image's 576 tokens; per conversation, the image comes once and every answer is still supervised.
Pure tokenization: no model, the same on any machine.
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

from posttrain.data.examples import group_conversations
from posttrain.data.lrv import flatten_rows, load_lrv_rows
from posttrain.models.template import IGNORE_INDEX, conversation_text, encode_conversation
from posttrain.realscale.standin import LLAVA_SPECIALS, standin_tokenizer, write_lrv_parquet

IMAGE_TOKENS = 576  # LLaVA-1.5: (336 / 14)² patches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1776, help="charts (LRV Chart: 1,776 rows)")
    ap.add_argument("--out", default="bench/results/tokens.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        parquet = write_lrv_parquet(Path(tmp) / "lrv.parquet", images=args.rows, size=336)
        examples, report = flatten_rows(load_lrv_rows(str(parquet), "", "", "", ""), Path(tmp) / "images")
    texts = [conversation_text(e.history, e.question, e.answer) for e in examples]
    tok = standin_tokenizer(texts, LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")

    per_turn = [encode_conversation(tok, (), e.question, e.answer, IMAGE_TOKENS) for e in examples]
    conversations = group_conversations(examples)
    per_conversation = [
        encode_conversation(tok, c.turns[:-1], *c.turns[-1], IMAGE_TOKENS, supervise_history=True)
        for c in conversations
    ]

    def summary(sequences):
        tokens = sum(len(ids) for ids, _ in sequences)
        return {
            "sequences": len(sequences),
            "tokens": tokens,
            "image_tokens": IMAGE_TOKENS * len(sequences),
            "supervised_tokens": sum(sum(lab != IGNORE_INDEX for lab in labels) for _, labels in sequences),
            "longest": max(len(ids) for ids, _ in sequences),
        }

    before, after = summary(per_turn), summary(per_conversation)
    result = {
        "command": "python bench/tokens.py",
        "machine": f"{platform.machine()}, Python {platform.python_version()} (tokenization only)",
        "data": {
            k: report[k] for k in ("rows_kept", "conversations", "examples", "images", "duplicate_images")
        },
        "turns_per_conversation": round(len(examples) / len(conversations), 3),
        "per_turn": before,
        "per_conversation": after,
        "tokens_saved_fraction": round(1 - after["tokens"] / before["tokens"], 4),
    }
    for name, s in (("per turn", before), ("per conversation", after)):
        print(
            f"{name:>17}: {s['sequences']:>5} sequences, {s['tokens']:>9,} tokens per epoch "
            f"({s['image_tokens']:,} image, {s['supervised_tokens']:,} supervised), longest {s['longest']}"
        )
    print(
        f"{result['turns_per_conversation']} turns per conversation: "
        f"{100 * result['tokens_saved_fraction']:.1f}% fewer tokens per epoch, the same supervised tokens"
    )
    assert before["supervised_tokens"] == after["supervised_tokens"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
