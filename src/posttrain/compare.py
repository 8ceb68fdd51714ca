"""Compare models' responses on the same prompts: metric means with bootstrap CIs, deltas vs a baseline.

Input is one JSONL per model (the model name is the file stem). Each row holds ``id``, ``prompt``,
``reference`` and ``response``, and optionally:

- ``critic_score`` (0-100): a judge's score, used as given; metric ``critic`` when every row of
  every model has one.
- ``short_answer`` (str or null) and ``extracted`` (str or null): metric ``relaxed_acc`` on rows
  with a non-null short answer. The prediction is ``extracted`` when the row has that field
  (null never matches), else the whole response, stripped.
- ``negative`` (bool) and ``declined`` (bool): metric ``negative_acc``, the percentage of
  negative rows (``negative`` true) the model declined. Needs ``negative`` on every row and
  ``declined`` on every negative row.
- ``image``: ignored here.

Rows are paired across models by ``id``. `compare` returns::

    {"models": {NAME: {"n": N,
                       "metrics": {METRIC: {"mean": x, "ci": [lo, hi]}},
                       "vs_baseline": {METRIC: {"delta": d, "ci": [lo, hi], "p": p}}}}}

where the baseline's ``vs_baseline`` is ``{}``. Undefined numbers (NaN) are None.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from posttrain.metrics import (
    ItemStats,
    bleu_item_stats,
    bootstrap_ci,
    mean_stats,
    paired_bootstrap,
    relaxed_match,
    rouge_l,
)

REQUIRED_FIELDS = ("id", "prompt", "reference", "response")
METRIC_ORDER = ("bleu", "rouge_l", "critic", "relaxed_acc", "negative_acc")
_SHOW_IDS = 5
# Optional fields: name, accepted types, description for the error message.
_OPTIONAL_FIELDS: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("critic_score", (int, float), "a number"),
    ("short_answer", (str, int, float), "a string"),
    ("extracted", (str,), "a string"),
    ("negative", (bool,), "true/false"),
    ("declined", (bool,), "true/false"),
)


class CompareError(ValueError):
    """Invalid comparison input; the message says which file/model, row and field."""


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _row_problem(row: object) -> str | None:
    """Describe what is wrong with one row; None if it has the required fields with usable types."""
    if not isinstance(row, dict):
        return f"row is a JSON {type(row).__name__}, not an object"
    for key in REQUIRED_FIELDS:
        if key not in row:
            return f"missing required field {key!r}"
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        return f"field 'id' must be a string or an integer, got {row['id']!r}"
    for key in ("reference", "response"):
        if not isinstance(row[key], str):
            return f"field {key!r} must be a string, got {type(row[key]).__name__}"
    for key, types, what in _OPTIONAL_FIELDS:
        value = row.get(key)
        wrong_type = not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        if value is not None and wrong_type:
            return f"field {key!r} must be {what} or null, got {value!r}"
    return None


def _check_unique_ids(label: str, rows: list[dict], where: Callable[[int], str]) -> None:
    """Raise naming the first duplicate id and the two rows that carry it."""
    seen: dict[object, int] = {}
    for i, row in enumerate(rows):
        if row["id"] in seen:
            raise CompareError(
                f"{label}: duplicate id {row['id']!r} ({where(seen[row['id']])} and {where(i)})."
            )
        seen[row["id"]] = i


def load_responses(path: str | Path) -> list[dict]:
    """Read one model's response JSONL and validate every row.

    Args:
        path: JSONL file, one row per prompt.

    Returns:
        The rows, in file order.

    Raises:
        CompareError: A line is not JSON, a row misses a required field (the message names the
            file, the line number and the field), or an id repeats.
    """
    path = Path(path)
    rows: list[dict] = []
    line_of: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e}).") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CompareError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from e
        problem = _row_problem(row)
        if problem:
            raise CompareError(f"{path}:{lineno}: {problem}.")
        rows.append(row)
        line_of.append(lineno)
    _check_unique_ids(str(path), rows, lambda i: f"line {line_of[i]}")
    return rows


def _show(ids: set) -> str:
    """Format a few ids, sorted, for an error message."""
    shown = sorted(ids, key=lambda x: (str(type(x)), x))[:_SHOW_IDS]
    more = f" and {len(ids) - _SHOW_IDS} more" if len(ids) > _SHOW_IDS else ""
    return ", ".join(repr(x) for x in shown) + more


def check_rows(models: dict[str, list[dict]]) -> None:
    """Check that every model's rows are valid, have unique ids and cover the same ids.

    Args:
        models: Rows per label (a model name, or a file path for clearer messages).

    Raises:
        CompareError: Naming the label, and the duplicate id or a few missing/extra ids.
    """
    for label, rows in models.items():
        for i, row in enumerate(rows):
            problem = _row_problem(row)
            if problem:
                raise CompareError(f"{label}: row {i + 1}: {problem}.")
        _check_unique_ids(label, rows, lambda i: f"row {i + 1}")
    labels = list(models)
    if not labels:
        raise CompareError("no models to compare.")
    first = labels[0]
    first_ids = {row["id"] for row in models[first]}
    for label in labels[1:]:
        ids = {row["id"] for row in models[label]}
        if ids != first_ids:
            parts = []
            if first_ids - ids:
                parts.append(f"lacks {_show(first_ids - ids)}")
            if ids - first_ids:
                parts.append(f"has extra {_show(ids - first_ids)}")
            raise CompareError(
                f"{label} and {first} do not have the same ids: {label} {' and '.join(parts)}."
            )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _relaxed_value(row: dict) -> float | None:
    """100/0 relaxed accuracy of one row, None when it has no short answer."""
    target = row.get("short_answer")
    if target is None:
        return None
    prediction = row["extracted"] if "extracted" in row else row["response"].strip()
    return 100.0 * relaxed_match(prediction, str(target))


def _negative_value(row: dict) -> float | None:
    """100 if a negative row was declined, 0 if not, None for rows that are not negative."""
    if not row.get("negative"):
        return None
    return 100.0 * bool(row["declined"])


def available_metrics(models: dict[str, list[dict]]) -> list[str]:
    """List the metrics computable for every model, in `METRIC_ORDER`.

    Args:
        models: Rows per model.

    Returns:
        Names among "bleu", "rouge_l", "critic", "relaxed_acc", "negative_acc".
    """
    all_rows = [row for rows in models.values() for row in rows]
    present = ["bleu", "rouge_l"]
    if all_rows and all(row.get("critic_score") is not None for row in all_rows):
        present.append("critic")
    if all(any(row.get("short_answer") is not None for row in rows) for rows in models.values()):
        present.append("relaxed_acc")
    if (
        all("negative" in row for row in all_rows)
        and all("declined" in row for row in all_rows if row["negative"])
        and all(any(row["negative"] for row in rows) for rows in models.values())
    ):
        present.append("negative_acc")
    return [m for m in METRIC_ORDER if m in present]


def item_stats(rows: list[dict], metric: str) -> ItemStats:
    """Per-item statistics of one metric for one model's rows (in the given order).

    Args:
        rows: One model's rows.
        metric: One of `METRIC_ORDER`.

    Returns:
        The metric as `ItemStats`, ready for `bootstrap_ci` / `paired_bootstrap`.
    """
    if metric == "bleu":
        return bleu_item_stats(metric, [r["response"] for r in rows], [r["reference"] for r in rows])
    if metric == "rouge_l":
        return mean_stats(metric, [rouge_l(r["response"], r["reference"]) for r in rows])
    if metric == "critic":
        return mean_stats(metric, [float(r["critic_score"]) for r in rows])
    if metric == "relaxed_acc":
        return mean_stats(metric, [_relaxed_value(r) for r in rows])
    if metric == "negative_acc":
        return mean_stats(metric, [_negative_value(r) for r in rows])
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_ORDER)}.")


def _num(x: float) -> float | None:
    """JSON-safe float: NaN becomes None."""
    x = float(x)
    return None if math.isnan(x) else x


def compare(models: dict[str, list[dict]], baseline: str, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Score every model, with bootstrap CIs and paired-bootstrap deltas against the baseline.

    Rows are paired by ``id``; every model must have the same ids (order may differ). CIs are
    percentile bootstrap intervals (`posttrain.metrics.bootstrap_ci`), deltas and p-values come
    from `posttrain.metrics.paired_bootstrap`; the same seed is used everywhere, so all metrics
    and models see the same resampled item sets.

    Args:
        models: Rows per model name (e.g. from `load_responses`).
        baseline: The model the others are compared with.
        n_resamples: Bootstrap resamples.
        seed: Seed for the resampling.

    Returns:
        The result structure described in the module docstring.

    Raises:
        CompareError: Unknown baseline, invalid rows, duplicate or mismatched ids.
    """
    if baseline not in models:
        names = ", ".join(models) or "(none)"
        raise CompareError(f"baseline {baseline!r} is not one of the models: {names}.")
    check_rows(models)
    order = [row["id"] for row in models[baseline]]
    aligned = {name: _align(rows, order) for name, rows in models.items()}
    metrics = available_metrics(aligned)
    stats = {name: {m: item_stats(rows, m) for m in metrics} for name, rows in aligned.items()}

    result: dict = {"models": {}}
    for name in aligned:
        entry: dict = {"n": len(order), "metrics": {}, "vs_baseline": {}}
        for m in metrics:
            lo, hi = bootstrap_ci(stats[name][m], n_resamples=n_resamples, seed=seed)
            entry["metrics"][m] = {"mean": _num(stats[name][m].value()), "ci": [_num(lo), _num(hi)]}
            if name != baseline:
                d = paired_bootstrap(stats[baseline][m], stats[name][m], n_resamples=n_resamples, seed=seed)
                entry["vs_baseline"][m] = {
                    "delta": _num(d["delta"]),
                    "ci": [_num(d["ci"][0]), _num(d["ci"][1])],
                    "p": _num(d["p"]),
                }
        result["models"][name] = entry
    return result


def _align(rows: list[dict], order: list) -> list[dict]:
    """Rows reordered to follow the id order `order`."""
    by_id = {row["id"]: row for row in rows}
    return [by_id[i] for i in order]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def format_p(p: float | None) -> str:
    """``p=0.123``, or ``p<0.001``: the bootstrap does not resolve below 1/B, so tiny values are a bound."""
    if p is None:
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def format_markdown(result: dict) -> str:
    """Render a `compare` result as markdown tables.

    The first table has one row per model and ``mean [lo, hi]`` per metric; the second, titled
    "vs <baseline>", has ``delta [lo, hi] (p=...)`` for every other model. The baseline is the
    model whose ``vs_baseline`` is empty, and it is listed first.

    Args:
        result: As returned by `compare`.

    Returns:
        Markdown text ending in a newline.
    """
    models = result["models"]
    if not models:
        return "(no models)\n"
    baselines = [name for name, e in models.items() if not e["vs_baseline"]]
    baseline = baselines[0] if baselines else None
    names = ([baseline] if baseline else []) + [n for n in models if n != baseline]
    metrics = [m for m in METRIC_ORDER if m in models[names[0]]["metrics"]]
    metrics += [m for m in models[names[0]]["metrics"] if m not in metrics]

    lines = ["| model | n | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for name in names:
        cells = []
        for m in metrics:
            v = models[name]["metrics"][m]
            cells.append(f"{_fmt(v['mean'])} [{_fmt(v['ci'][0])}, {_fmt(v['ci'][1])}]")
        lines.append(f"| {name} | {models[name]['n']} | " + " | ".join(cells) + " |")

    others = [n for n in names if n != baseline]
    if baseline and others:
        lines += ["", f"vs {baseline}", ""]
        lines += ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for name in others:
            cells = []
            for m in metrics:
                d = models[name]["vs_baseline"][m]
                cells.append(
                    f"{_fmt(d['delta'], True)} [{_fmt(d['ci'][0], True)}, {_fmt(d['ci'][1], True)}]"
                    f" ({format_p(d['p'])})"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
