"""Compare models' responses on the same prompts: metric means with bootstrap CIs, deltas vs a baseline.

Input is one JSONL per model (the model name is the file stem). Each row holds ``id``, ``prompt``,
``reference`` and ``response``, and optionally:

- ``critic_score`` (0-100 or null): a judge's score, used as given; metric ``critic`` when every model
  has at least one. A null (the judge gave no parsable score) leaves that row out of the model's mean, and
  out of every paired test that involves the model: pairs use the rows scored for both.
- ``short_answer`` (str or null) and ``extracted`` (str or null): metric ``relaxed_acc`` on rows
  with a non-null short answer. The prediction is ``extracted`` when the row has that field
  (null never matches), else the whole response, stripped; a row's own ``correct`` (true/false), as the
  evaluation writes it, is used as given.
- ``negative`` (bool) and ``declined`` (bool): metric ``negative_acc``, the percentage of
  negative rows (``negative`` true) the model declined. Needs ``negative`` on every row and
  ``declined`` on every negative row.
- ``image``: ignored here.

Rows are paired across models by ``id``. `compare` returns::

    {"models": {NAME: {"n": N,
                       "metrics": {METRIC: {"mean": x, "ci": [lo, hi], "n": n}},
                       "vs_baseline": {METRIC: {"delta": d, "ci": [lo, hi], "p": p, "p_holm": q,
                                                "n": n}}}}}

``p_holm`` is Holm's adjustment of ``p`` over every test of the comparison (all models and metrics against
the baseline), the one to read when asking which of the many differences are significant. A metric's ``n``
counts the rows it is computed on (rows with a short answer for relaxed_acc, negative rows for negative_acc,
scored rows for critic; for a paired test, rows that count for both).

where the baseline's ``vs_baseline`` is ``{}``. Undefined numbers (NaN) are None.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from posttrain.core.errors import DataError
from posttrain.evaluate.metrics import (
    ItemStats,
    bleu_item_stats,
    bootstrap_ci,
    holm_adjust,
    mean_stats,
    paired_bootstrap,
    relaxed_match,
    rouge_l,
    wilson_interval,
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
    ("correct", (bool,), "true/false"),
)


class CompareError(DataError):
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
    score = row.get("critic_score")  # JSON's NaN and Infinity literals parse as floats
    if score is not None and not (math.isfinite(score) and 0 <= score <= 100):
        return f"field 'critic_score' must be a score from 0-100 or null, got {score!r}"
    return None


def _no_rows(label: str) -> CompareError:
    """A model with no rows: a comparison of it would be a table of n = 0."""
    return CompareError(
        f"{label}: no rows; write one JSON object per line (a model's responses, one per prompt), or leave "
        "the file out"
    )


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
        CompareError: The file has no rows, a line is not JSON, a row misses a required field or has a
            critic score outside 0-100 or not finite (the message names the file, the line number and the
            field), or an id repeats.
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
    if not rows:
        raise _no_rows(str(path))
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
        CompareError: Naming the label, and that it has no rows, or the duplicate id or a few missing/extra
            ids.
    """
    for label, rows in models.items():
        if not rows:
            raise _no_rows(label)
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
    """100/0 relaxed accuracy of one row, None when it has no short answer.

    A row that carries ``correct`` (the evaluation's verdict, which also checks that the answer is about
    the asked element) is scored by it, so the report's paired tests agree with the metrics files.
    """
    target = row.get("short_answer")
    if target is None:
        return None
    if isinstance(row.get("correct"), bool):
        return 100.0 * row["correct"]
    prediction = row["extracted"] if "extracted" in row else row["response"].strip()
    return 100.0 * relaxed_match(prediction, str(target))


def _critic_value(row: dict) -> float | None:
    """The row's critic score, None when the judge gave none."""
    score = row.get("critic_score")
    return None if score is None else float(score)


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
    if models and all(any(row.get("critic_score") is not None for row in rows) for rows in models.values()):
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
        return mean_stats(metric, [_critic_value(r) for r in rows])
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
    percentile bootstrap intervals (`posttrain.evaluate.metrics.bootstrap_ci`) for means and Wilson intervals
    (`posttrain.evaluate.metrics.wilson_interval`) for the proportions relaxed_acc and negative_acc; deltas
    and p-values come from `posttrain.evaluate.metrics.paired_bootstrap`; the same seed is used everywhere, so
    all metrics and models see the same resampled item sets.

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
            lo, hi = _interval(aligned[name], stats[name][m], m, n_resamples, seed)
            entry["metrics"][m] = {
                "mean": _num(stats[name][m].value()),
                "ci": [_num(lo), _num(hi)],
                "n": _counted(aligned[name], m),
            }
            if name != baseline:
                a, b = _paired_rows(aligned[baseline], aligned[name], m)
                d = paired_bootstrap(item_stats(a, m), item_stats(b, m), n_resamples=n_resamples, seed=seed)
                entry["vs_baseline"][m] = {
                    "delta": _num(d["delta"]),
                    "ci": [_num(d["ci"][0]), _num(d["ci"][1])],
                    "p": _num(d["p"]),
                    "n": _counted(a, m),
                }
        result["models"][name] = entry
    # one correction over every test of this comparison (every model x metric against the baseline)
    tests = [(e, m) for e in result["models"].values() for m in e["vs_baseline"]]
    for (e, m), p in zip(tests, holm_adjust([e["vs_baseline"][m]["p"] for e, m in tests])):
        e["vs_baseline"][m]["p_holm"] = p
    return result


PROPORTIONS = ("relaxed_acc", "negative_acc")


def _interval(rows: list[dict], stats: ItemStats, metric: str, n_resamples: int, seed: int):
    """95% interval of one model's metric: Wilson for proportions, percentile bootstrap for means."""
    if metric not in PROPORTIONS:
        return bootstrap_ci(stats, n_resamples=n_resamples, seed=seed)
    value = _relaxed_value if metric == "relaxed_acc" else _negative_value
    counted = [v for v in (value(r) for r in rows) if v is not None]
    lo, hi = wilson_interval(sum(v > 0 for v in counted), len(counted))
    return (math.nan, math.nan) if lo is None else (100.0 * lo, 100.0 * hi)


def answer_spread(rows: list[dict]) -> dict[str, dict]:
    """Per family: how many distinct short answers a model gave and the share of its most common one.

    A share near 1 flags a constant answerer, whose accuracy is the chance line's, not reading.
    """
    out = {}
    for family in sorted({r["family"] for r in rows if r.get("short_answer") is not None}):
        given = [r["extracted"] for r in rows if r["family"] == family and r.get("short_answer") is not None]
        counts = Counter(str(x).lower() for x in given if x is not None)
        top = counts.most_common(1)[0][1] if counts else 0
        out[family] = {"distinct": len(counts), "top_share": top / len(given) if given else 0.0}
    return out


def _counted(rows: list[dict], metric: str) -> int:
    """How many rows a metric is computed on (all rows for bleu and rouge_l)."""
    value = {"critic": _critic_value, "relaxed_acc": _relaxed_value, "negative_acc": _negative_value}.get(
        metric
    )
    return len(rows) if value is None else sum(value(r) is not None for r in rows)


def _paired_rows(a: list[dict], b: list[dict], metric: str) -> tuple[list[dict], list[dict]]:
    """The two models' aligned rows for a paired test: for critic, only rows scored for both count."""
    if metric != "critic":
        return a, b
    both = [x.get("critic_score") is not None and y.get("critic_score") is not None for x, y in zip(a, b)]
    return (
        [x if keep else {**x, "critic_score": None} for x, keep in zip(a, both)],
        [y if keep else {**y, "critic_score": None} for y, keep in zip(b, both)],
    )


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


def _holm_note(p_holm: float | None) -> str:
    """``, Holm p=…`` beside a raw p-value."""
    return "" if p_holm is None else f", Holm {format_p(p_holm)}"


def _n_note(n: int | None, total: int, inline: bool = False) -> str:
    """``n=K`` where a metric counts fewer rows than the table's n (a subset, or unscored rows left out)."""
    if n is None or n >= total:
        return ""
    return f", n={n}" if inline else f" n={n}"


def format_p(p: float | None) -> str:
    """``p=0.123``, or ``p<0.001``: the bootstrap does not resolve below 1/B, so tiny values are a bound."""
    if p is None:
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def format_markdown(result: dict, deltas_only: bool = False) -> str:
    """Render a `compare` result as markdown tables.

    The first table has one row per model and ``mean [lo, hi]`` per metric; the second, titled
    "vs <baseline>", has ``delta [lo, hi] (p=...)`` for every other model. The baseline is the
    model whose ``vs_baseline`` is empty, and it is listed first.

    Args:
        result: As returned by `compare`.
        deltas_only: only the "vs <baseline>" table (where the means are shown elsewhere).

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
    for name in [] if deltas_only else names:
        cells = []
        for m in metrics:
            v = models[name]["metrics"][m]
            cells.append(
                f"{_fmt(v['mean'])} [{_fmt(v['ci'][0])}, {_fmt(v['ci'][1])}]"
                + _n_note(v.get("n"), models[name]["n"])
            )
        lines.append(f"| {name} | {models[name]['n']} | " + " | ".join(cells) + " |")

    others = [n for n in names if n != baseline]
    if deltas_only:
        lines = []
    if baseline and others:
        lines += [] if deltas_only else ["", f"vs {baseline}", ""]
        lines += ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for name in others:
            cells = []
            for m in metrics:
                d = models[name]["vs_baseline"][m]
                cells.append(
                    f"{_fmt(d['delta'], True)} [{_fmt(d['ci'][0], True)}, {_fmt(d['ci'][1], True)}]"
                    f" ({format_p(d['p'])}{_holm_note(d.get('p_holm'))}"
                    f"{_n_note(d.get('n'), models[name]['n'], inline=True)})"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
