"""The `evaluate` stage's work: answer the test splits, score every item, aggregate with bootstrap CIs.

Every turn of every test conversation is an item, asked after its conversation's earlier turns (the reference
answers as history), as the dataset asks it. Per-item rows are saved in the schema of
``python -m posttrain compare`` (``id``, ``prompt``, ``reference``, ``response``, ``critic_score``, ...), one
file per model and split, so every later comparison is paired.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from posttrain.core.config import EvaluateParams
from posttrain.core.distributed import is_main
from posttrain.core.io import write_json_atomic, write_jsonl
from posttrain.data.answers import extract, names
from posttrain.data.charts import COLORS
from posttrain.data.declines import is_decline
from posttrain.data.examples import AnswerType, Example, load_split
from posttrain.evaluate.generation import answer_nll, generate
from posttrain.evaluate.metrics import (
    CORE_METRICS,
    ItemStats,
    bleu_item_stats,
    bootstrap_ci,
    mean_stats,
    newcombe_interval,
    relaxed_match,
    rouge_l,
    wilson_interval,
)
from posttrain.models.images import load_pixels
from posttrain.models.loading import image_token_count
from posttrain.models.template import IGNORE_INDEX, encode_conversation

# (evaluation split, metric prefix): the study test split, and the retention test of the pretrain families.
EVAL_SPLITS = (("study_test", ""), ("pretrain_test", "retain_"))
# what `dvc metrics show` puts in its table: one row per model that fits a terminal. The rest (CIs, n,
# per-family accuracy, chance lines, retention detail) is in the details file the report reads.
HEADLINE = (
    "loss",
    "bleu",
    "rouge_l",
    "critic",
    "relaxed_acc",
    "negative_acc",
    "decline_discrimination",
    "retain_relaxed_acc",
)


def headline(metrics: dict) -> dict:
    """The headline metrics of a details dict, rounded for the table (the details keep full precision)."""
    return {k: None if metrics.get(k) is None else round(metrics[k], 3) for k in HEADLINE}


def extract_short_answer(response: str, answer_type: AnswerType) -> str | None:
    """The short answer a response commits to, by the question's answer type
    (`posttrain.data.answers.extract`).

    Numbers: the first that is not a year ("In 2019 the value was 45." -> 45). Colours, yes/no, trends: the
    first word of that vocabulary (trend words such as "rose" or "fell" included). Free text: the whole
    response without a trailing period. Negative questions have none (they are scored by declining).
    """
    return extract(response, answer_type)


def names_asked_element(example: Example, response: str) -> bool:
    """Whether the response is about what was asked: on synthetic data, it names the asked colour.

    "The orange line is increasing." does not answer "Is the cyan line increasing?", and "There is no
    purple." does not decline a question about a green bar. Where the asked element is unknown (LRV rows,
    questions naming no colour) every response passes.
    """
    colour = example.asked_colour(COLORS)
    return colour is None or names(response, colour)


def is_correct(example: Example, response: str, extracted: str | None) -> bool:
    """Negative questions: declined. Others: relaxed match of the extracted short answer. Either way the
    response must be about the asked element (`names_asked_element`).
    """
    if not names_asked_element(example, response):
        return False
    if example.negative:
        return is_decline(response)
    return example.short_answer is not None and relaxed_match(extracted, example.short_answer)


def score_items(
    examples: list[Example],
    responses: list[str],
    nll_sums: list[float],
    token_counts: list[int],
    critic_scores: list[float | None],
    critic_replies: list[str] | None = None,
) -> list[dict]:
    """One row per item, in the `compare` schema plus the per-item numbers the metrics need.

    With a critic model, each row keeps the critic's reply (``critic_reply``), so an unparsable score can be
    read back.
    """
    rows = []
    replies = critic_replies if critic_replies is not None else [None] * len(examples)
    for e, response, nll, n_tok, critic, reply in zip(
        examples, responses, nll_sums, token_counts, critic_scores, replies
    ):
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
                "declined": is_decline(response) and names_asked_element(e, response),
                "correct": is_correct(e, response, extracted),
                "critic_score": critic,
                **({"critic_reply": reply} if reply is not None else {}),
                "family": e.family,
                "nll": nll,
                "n_tokens": n_tok,
            }
        )
    return rows


def chance_lines(test: list[Example]) -> dict[str, float]:
    """Accuracy (0–100) per family of the best constant answer on the test split itself.

    The chance line a model must clear to show it reads the chart rather than the question: the most
    common training answer can score below it when the test split leans the other way (a model answering
    "increasing" to every line_trend item scores the share of increasing lines, whatever training held).
    Families without short answers (negatives) have none.
    """
    out = {}
    for family in sorted({e.family for e in test if e.short_answer is not None}):
        items = [e for e in test if e.family == family]
        candidates = sorted({e.short_answer for e in items})
        out[family] = max(
            100.0 * sum(relaxed_match(c, e.short_answer) for e in items) / len(items) for c in candidates
        )
    return out


def _with_ci(out: dict, name: str, stats: ItemStats, resamples: int, seed: int, transform=None) -> None:
    value = stats.value()
    lo, hi = bootstrap_ci(stats, n_resamples=resamples, seed=seed)
    f = transform or (lambda x: x)
    for key, v in ((name, value), (f"{name}_ci_low", lo), (f"{name}_ci_high", hi)):
        v = f(v) if v is not None and not math.isnan(v) else None
        out[key] = None if v is None else round(float(v), 4)


def _with_wilson(out: dict, name: str, values: list[float | None]) -> None:
    """A proportion (values 100/0, None = not counted) with its Wilson 95% interval, 0-100."""
    counted = [v for v in values if v is not None]
    lo, hi = wilson_interval(sum(v > 0 for v in counted), len(counted))
    out[name] = round(float(np.mean(counted)), 4) if counted else None
    out[f"{name}_ci_low"] = None if lo is None else round(100.0 * lo, 4)
    out[f"{name}_ci_high"] = None if hi is None else round(100.0 * hi, 4)


def _with_newcombe(out: dict, name: str, hits: list[bool], false_alarms: list[bool]) -> None:
    """Points (−100..100) of the difference of two proportions, with Newcombe's 95% interval."""
    k1, n1, k2, n2 = sum(hits), len(hits), sum(false_alarms), len(false_alarms)
    lo, hi = newcombe_interval(k1, n1, k2, n2)
    out[name] = round(100.0 * (k1 / n1 - k2 / n2), 4) if lo is not None else None
    out[f"{name}_ci_low"] = None if lo is None else round(100.0 * lo, 4)
    out[f"{name}_ci_high"] = None if hi is None else round(100.0 * hi, 4)


def decline_groups(rows: list[dict]) -> tuple[list[bool], list[bool]]:
    """(declined, per negative row; declined, per answerable row of a family that has negatives).

    A negative's family is its answerable family's name with ``_negative`` (``bar_value_negative``,
    ``lrv_negative``). Only those answerable families are compared: the question forms a model could learn
    to decline as a form, whatever the chart shows.
    """
    suffix = "_negative"
    families = {r["family"][: -len(suffix)] for r in rows if r["negative"] and r["family"].endswith(suffix)}
    hits = [r["declined"] for r in rows if r["negative"]]
    false_alarms = [is_decline(r["response"]) for r in rows if not r["negative"] and r["family"] in families]
    return hits, false_alarms


def aggregate(rows: list[dict], prefix: str, resamples: int, seed: int) -> dict:
    """Flat metrics of one split: every core metric with a 95% CI, keys prefixed with `prefix`.

    `loss` is the mean NLL per answer token over all answer tokens (sums of NLL over sums of tokens),
    `perplexity` its exponential (CI bounds transform with it); scores are 0–100. Means (loss, BLEU,
    ROUGE-L, critic) get percentile-bootstrap intervals; proportions (relaxed_acc, negative_acc) get Wilson
    intervals, which do not collapse to [0, 0] on small groups.

    ``decline_discrimination`` is whether declining follows the chart: the share of negatives declined minus
    the share of answerable questions of the same families declined (`decline_groups`; Youden's J, in
    points), with Newcombe's interval. 0 is a policy that ignores the chart: declining every such question
    scores 100 on negative_acc and 0 here, as does declining none.
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
    means = {
        "rouge_l": [rouge_l(r["response"], r["reference"]) for r in rows],
        "critic": [r["critic_score"] for r in rows],
    }
    for name, values in means.items():
        _with_ci(out, f"{prefix}{name}", mean_stats(name, values), resamples, seed)
    proportions = {
        "relaxed_acc": [
            100.0 * r["correct"] if not r["negative"] and r["short_answer"] is not None else None
            for r in rows
        ],
        "negative_acc": [100.0 * r["declined"] if r["negative"] else None for r in rows],
        # the other side of declining: answerable questions turned down ("There is no ..."); lower is better
        "declined_answerable": [
            100.0 * is_decline(r["response"]) if not r["negative"] else None for r in rows
        ],
    }
    for name, values in proportions.items():
        _with_wilson(out, f"{prefix}{name}", values)
    _with_newcombe(out, f"{prefix}decline_discrimination", *decline_groups(rows))
    out[f"{prefix}critic_unparsable"] = sum(r["critic_score"] is None for r in rows)
    return out


def scored_families(examples) -> list[str]:
    """The families whose answers can be right or wrong: a short answer to match, or a negative to decline.

    Free-text families (captions, LRV rows without a short answer) have neither; BLEU, ROUGE-L and the
    critic score them, and an accuracy of 0 for them would say nothing.
    """
    return sorted({e.family for e in examples if e.negative or e.short_answer is not None})


def family_accuracy(rows: list[dict], families: list[str], resamples: int, seed: int) -> dict:
    """``acc_<family>``: share of correct answers (0–100) per question family, with Wilson 95% intervals."""
    out: dict = {}
    for f in families:
        _with_wilson(out, f"acc_{f}", [100.0 * r["correct"] if r["family"] == f else None for r in rows])
    return out


def reference_critic(examples: list[Example], responses: list[str]) -> list[float]:
    """The embedded default's critic: the ground-truth rubric of
    `posttrain.evaluate.reference.reference_score`.
    """
    from posttrain.evaluate.reference import reference_score

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
    from posttrain.evaluate.llava_critic import LlavaCriticJudge

    return LlavaCriticJudge(params.critic.model, revision=params.critic.revision or None)


def evaluation_phases(tokenizer, data_dir: Path, n_image_tokens: int, params: EvaluateParams) -> list:
    """The batches `evaluate_model` runs (`posttrain.models.memory.Phase`), over both test splits: greedy
    answers after the longest prompt, and the teacher-forced scoring of the longest sequence, whose logits are
    kept from the earliest answer start of a batch on.
    """
    from posttrain.models.memory import Phase

    prompts, sequences = [], []
    for split, _ in EVAL_SPLITS:
        for e in load_split(data_dir, split):
            ids, labels = encode_conversation(tokenizer, e.history, e.question, e.answer, n_image_tokens)
            sequences.append(len(ids))
            prompts.append(len(ids) - sum(lab != IGNORE_INDEX for lab in labels))
    if not prompts:
        return []
    return [
        Phase("answers", 1, max(prompts), params.max_new_tokens),
        Phase("scoring", 1, max(sequences), 0, max(sequences) - min(prompts)),
    ]


def evaluation_batch(
    params: EvaluateParams, base_dir: Path, adapter: Path | None, merge: bool, data_dir: Path
) -> int:
    """``evaluate.batch_size`` for the base in `base_dir` with the adapter folder `adapter` (None: the base
    alone), resolved before it loads (`posttrain.evaluate.generation.generation_batch`): only the base's
    config and processor and the adapter's safetensors header are read.
    """
    from posttrain.evaluate.generation import generation_batch
    from posttrain.models.loading import adapter_layer_bytes, base_config_and_processor

    config, processor = base_config_and_processor(base_dir)
    phases = evaluation_phases(processor.tokenizer, Path(data_dir), image_token_count(processor), params)
    if not phases:
        return params.batch_size if isinstance(params.batch_size, int) else 1
    adapter_bytes = 0.0 if merge or adapter is None else adapter_layer_bytes(adapter)
    items = max(len(load_split(data_dir, split)) for split, _ in EVAL_SPLITS)
    return generation_batch(
        "evaluate", params.batch_size, phases, config=config, adapter_bytes=adapter_bytes, prompts=items
    )


def evaluate_model(
    name: str,
    model,
    processor,
    data_dir: Path,
    params: EvaluateParams,
    items_dir: Path,
    details_path: Path,
) -> dict:
    """Evaluate one model on the study test split and the retention split; write items and metrics.

    Args:
        name: the model's name (``base``, ``sft1``, ...): the stem of its item files.
        model: a LLaVA model (possibly with a PEFT adapter), in eval mode.
        processor: its processor (template, tokenizer, image processing).
        data_dir: the prepared folder.
        params: the ``evaluate`` section.
        items_dir: per-item rows go to ``items_dir/<split>/<name>.jsonl``.
        details_path: every metric, flat, with its CI and n (``data/eval/metrics/<name>.json``); the stage
            writes the `headline` of it to ``metrics/<name>.json`` for `dvc metrics show`.

    Returns:
        The metrics written.
    """
    tokenizer = processor.tokenizer
    n_image_tokens = image_token_count(processor)
    critic = load_critic(params)
    families = scored_families(e for split, _ in EVAL_SPLITS for e in load_split(data_dir, split))
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
        # the generation prompt is the sequence without its supervised answer (the last tokens)
        prompts = [ids[: len(ids) - sum(lab != IGNORE_INDEX for lab in labels)] for ids, labels in sequences]
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
        replies = None
        if critic is None:
            scores = reference_critic(examples, responses)
        else:
            scores, replies = critic.score(
                critic_images(data_dir, examples),
                [e.context_question() for e in examples],
                responses,
                batch_size=params.critic.batch_size,
                max_new_tokens=params.critic.max_new_tokens,
            )
        rows = score_items(examples, responses, nll, counts, scores, replies)
        if is_main():  # the other processes computed their share of the batches
            write_jsonl(items_dir / split / f"{name}.jsonl", rows)
        all_rows += rows
        metrics.update(aggregate(rows, prefix, params.resamples, params.seed))
        metrics.update({f"chance_{f}": round(v, 4) for f, v in chance_lines(examples).items()})
        print(f"{name}/{split}: {len(rows)} items in {time.perf_counter() - t0:.1f}s", flush=True)
    metrics.update(family_accuracy(all_rows, families, params.resamples, params.seed))
    for f in families:  # same keys in every file, also where a split has no item of a family
        metrics.setdefault(f"chance_{f}", None)
    if is_main():
        write_json_atomic(details_path, metrics)
    return metrics
