"""The `evaluate` stage's work: answer the test splits, score every item, aggregate with bootstrap CIs.

Every turn of every test conversation is an item, asked after its conversation's earlier turns (the reference
answers as history), as the dataset asks it. Per-item rows are saved in the schema of
``python -m posttrain compare`` (``id``, ``prompt``, ``reference``, ``response``, ``critic_score``, ...), one
file per model and split, so every later comparison is paired.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from posttrain.charts import COLORS
from posttrain.config import EvaluateParams
from posttrain.data import AnswerType, Example, load_split
from posttrain.declines import is_decline
from posttrain.generation import answer_nll, generate
from posttrain.images import load_pixels
from posttrain.io import write_json_atomic, write_jsonl
from posttrain.metrics import (
    ItemStats,
    bleu_item_stats,
    bootstrap_ci,
    mean_stats,
    parse_number,
    relaxed_match,
    rouge_l,
)
from posttrain.models import image_token_count
from posttrain.template import encode_conversation, encode_prompt

# (evaluation split, metric prefix): the study test split, and the retention test of the pretrain families.
EVAL_SPLITS = (("study_test", ""), ("pretrain_test", "retain_"))
CORE_METRICS = ("loss", "perplexity", "bleu", "rouge_l", "critic", "relaxed_acc", "negative_acc")
_WORDS = {
    AnswerType.YES_NO: ("yes", "no"),
    AnswerType.TREND: ("increasing", "decreasing"),
    AnswerType.COLOR: tuple(COLORS),
}


def extract_short_answer(response: str, answer_type: AnswerType) -> str | None:
    """The short answer a response commits to, by the question's answer type.

    Numbers: the first number. Colours, yes/no, trends: the first word of that vocabulary. Free text: the
    whole response without a trailing period. Negative questions have none (they are scored by declining).
    """
    if answer_type is AnswerType.DECLINE:
        return None
    if answer_type is AnswerType.NUMBER:
        number = parse_number(response)
        return None if number is None else f"{number:g}"
    if answer_type is AnswerType.TEXT:
        return response.strip().rstrip(".").strip()
    vocab = _WORDS[answer_type]
    for word in re.findall(r"[a-z]+", response.lower()):
        if word in vocab:
            return word
    return None


def is_correct(example: Example, response: str, extracted: str | None) -> bool:
    """Negative questions: correct when declined. Others: relaxed match of the extracted short answer."""
    if example.negative:
        return is_decline(response)
    return example.short_answer is not None and relaxed_match(extracted, example.short_answer)


def score_items(
    examples: list[Example],
    responses: list[str],
    nll_sums: list[float],
    token_counts: list[int],
    critic_scores: list[float | None],
) -> list[dict]:
    """One row per item, in the `compare` schema plus the per-item numbers the metrics need."""
    rows = []
    for e, response, nll, n_tok, critic in zip(examples, responses, nll_sums, token_counts, critic_scores):
        # a declined positive question commits to no answer ("There is no red bar" does not answer "red")
        extracted = None if is_decline(response) else extract_short_answer(response, e.answer_type)
        rows.append(
            {
                "id": e.id,
                "image": e.image,
                "prompt": e.question,
                "history": [list(t) for t in e.history],
                "reference": e.answer,
                "response": response,
                "short_answer": e.short_answer,
                "extracted": extracted,
                "negative": e.negative,
                "declined": is_decline(response),
                "correct": is_correct(e, response, extracted),
                "critic_score": critic,
                "family": e.family,
                "nll": nll,
                "n_tokens": n_tok,
            }
        )
    return rows


def majority_baselines(train: list[Example], test: list[Example]) -> dict[str, float]:
    """Accuracy (0–100) per family of always giving that family's most common train answer.

    The chance line a model must clear to show it reads the chart rather than the question.
    Families without short answers (negatives) have no such baseline.
    """
    out = {}
    for family in sorted({e.family for e in test if e.short_answer is not None}):
        answers = Counter(e.short_answer for e in train if e.family == family)
        if not answers:
            continue
        guess = answers.most_common(1)[0][0]
        items = [e for e in test if e.family == family]
        out[family] = 100.0 * sum(relaxed_match(guess, e.short_answer) for e in items) / len(items)
    return out


def _with_ci(out: dict, name: str, stats: ItemStats, resamples: int, seed: int, transform=None) -> None:
    value = stats.value()
    lo, hi = bootstrap_ci(stats, n_resamples=resamples, seed=seed)
    f = transform or (lambda x: x)
    for key, v in ((name, value), (f"{name}_ci_low", lo), (f"{name}_ci_high", hi)):
        v = f(v) if v is not None and not math.isnan(v) else None
        out[key] = None if v is None else round(float(v), 4)


def aggregate(rows: list[dict], prefix: str, resamples: int, seed: int) -> dict:
    """Flat metrics of one split: every core metric with a 95% CI, keys prefixed with `prefix`.

    `loss` is the mean NLL per answer token over all answer tokens (sums of NLL over sums of tokens),
    `perplexity` its exponential (CI bounds transform with it); scores are 0–100.
    """
    out: dict = {f"{prefix}n_items": len(rows)}
    if not rows:
        for m in CORE_METRICS:
            for suffix in ("", "_ci_low", "_ci_high"):
                out[f"{prefix}{m}{suffix}"] = None
        out[f"{prefix}critic_unparsable"] = None
        return out
    loss = ItemStats("loss", np.array([[r["nll"], r["n_tokens"]] for r in rows], dtype=float), "mean")
    _with_ci(out, f"{prefix}loss", loss, resamples, seed)
    _with_ci(out, f"{prefix}perplexity", loss, resamples, seed, transform=math.exp)
    _with_ci(
        out,
        f"{prefix}bleu",
        bleu_item_stats("bleu", [r["response"] for r in rows], [r["reference"] for r in rows]),
        resamples,
        seed,
    )
    per_item = {
        "rouge_l": [rouge_l(r["response"], r["reference"]) for r in rows],
        "critic": [r["critic_score"] for r in rows],
        "relaxed_acc": [
            100.0 * r["correct"] if not r["negative"] and r["short_answer"] is not None else None
            for r in rows
        ],
        "negative_acc": [100.0 * r["declined"] if r["negative"] else None for r in rows],
    }
    for name, values in per_item.items():
        _with_ci(out, f"{prefix}{name}", mean_stats(name, values), resamples, seed)
    out[f"{prefix}critic_unparsable"] = sum(r["critic_score"] is None for r in rows)
    return out


def family_accuracy(rows: list[dict], families: list[str], resamples: int, seed: int) -> dict:
    """``acc_<family>``: share of correct answers (0–100) per question family, with 95% CIs."""
    out: dict = {}
    for f in families:
        _with_ci(
            out,
            f"acc_{f}",
            mean_stats(f, [100.0 * r["correct"] if r["family"] == f else None for r in rows]),
            resamples,
            seed,
        )
    return out


def reference_critic(examples: list[Example], responses: list[str]) -> list[float]:
    """The embedded default's critic: the ground-truth rubric of `posttrain.critic.reference_score`."""
    from posttrain.critic import reference_score

    return [
        reference_score(e, r, extract_short_answer(r, e.answer_type), COLORS)
        for e, r in zip(examples, responses)
    ]


def critic_images(data_dir: Path, examples: list[Example]) -> list:
    """The images a critic model sees: whole, as stored (its own processor tiles the whole chart)."""
    from PIL import Image

    images = []
    for e in examples:
        with Image.open(data_dir / e.image) as im:
            images.append(im.convert("RGB"))
    return images


def load_critic(params: EvaluateParams):
    """The LLaVA-Critic judge, loaded once per evaluation (None for the reference critic)."""
    if not params.critic.kind.needs_model:
        return None
    from posttrain.critic import LlavaCriticJudge

    return LlavaCriticJudge(params.critic.model, revision=params.critic.revision or None)


def evaluate_model(
    name: str,
    model,
    processor,
    data_dir: Path,
    params: EvaluateParams,
    items_dir: Path,
    metrics_path: Path,
) -> dict:
    """Evaluate one model on the study test split and the retention split; write items and metrics.

    Args:
        name: the model's name (``base``, ``sft1``, ...): the stem of its item files.
        model: a LLaVA model (possibly with a PEFT adapter), in eval mode.
        processor: its processor (template, tokenizer, image processing).
        data_dir: the prepared folder.
        params: the ``evaluate`` section.
        items_dir: per-item rows go to ``items_dir/<split>/<name>.jsonl``.
        metrics_path: the flat metrics JSON, ``metrics/<name>.json``.

    Returns:
        The metrics written.
    """
    tokenizer = processor.tokenizer
    n_image_tokens = image_token_count(processor)
    critic = load_critic(params)
    families = sorted({e.family for split, _ in EVAL_SPLITS for e in load_split(data_dir, split)})
    metrics: dict = {}
    all_rows: list[dict] = []
    for split, prefix in EVAL_SPLITS:
        t0 = time.perf_counter()
        examples = load_split(data_dir, split)
        pixel_map = load_pixels(processor, data_dir, [e.image for e in examples])
        pixels = [pixel_map[e.image] for e in examples]
        # each turn after its history; the reference answer's tokens carry the loss
        sequences = [
            encode_conversation(tokenizer, e.history, e.question, e.answer, n_image_tokens) for e in examples
        ]
        prompts = [encode_prompt(tokenizer, e.history, e.question, n_image_tokens) for e in examples]
        responses = (
            generate(
                model,
                tokenizer,
                pixels,
                prompts,
                batch_size=params.batch_size,
                max_new_tokens=params.max_new_tokens,
                progress=f"{name}/{split}",
            )
            if examples
            else []
        )
        nll, counts = (
            answer_nll(model, tokenizer, pixels, sequences, batch_size=params.batch_size)
            if examples
            else ([], [])
        )
        if critic is None:
            scores = reference_critic(examples, responses)
        else:
            scores, _ = critic.score(
                critic_images(data_dir, examples),
                [e.context_question() for e in examples],
                responses,
                batch_size=params.critic.batch_size,
                max_new_tokens=params.critic.max_new_tokens,
            )
        rows = score_items(examples, responses, nll, counts, scores)
        write_jsonl(items_dir / split / f"{name}.jsonl", rows)
        all_rows += rows
        metrics.update(aggregate(rows, prefix, params.resamples, params.seed))
        train = load_split(data_dir, split.replace("_test", "_train"))
        metrics.update({f"majority_{f}": round(v, 4) for f, v in majority_baselines(train, examples).items()})
        print(f"{name}/{split}: {len(rows)} items in {time.perf_counter() - t0:.1f}s", flush=True)
    metrics.update(family_accuracy(all_rows, families, params.resamples, params.seed))
    for f in families:  # same keys in every file, also where a split has no item of a family
        metrics.setdefault(f"majority_{f}", None)
    write_json_atomic(metrics_path, metrics)
    return metrics
