"""The `report` stage's work: the comparison table with CIs, paired deltas, a plot and browsable examples."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from posttrain.core import layout  # noqa: E402
from posttrain.core.config import ReportParams  # noqa: E402
from posttrain.core.io import read_json, read_jsonl, write_text_atomic  # noqa: E402
from posttrain.evaluate.metrics import CORE_METRICS  # noqa: E402
from posttrain.report.compare import answer_spread, compare, format_markdown, format_p  # noqa: E402

PLOTTED = ("relaxed_acc", "negative_acc", "critic", "rouge_l", "bleu")
TABLE = tuple(m for m in CORE_METRICS if m != "perplexity")  # exp(loss): the loss column says it
SIGNIFICANCE = 0.05


def _cell(m: dict, key: str) -> str:
    v, lo, hi = m.get(key), m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if v is None:
        return "n/a"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{v:.2f}"


def metrics_table(metrics: dict[str, dict], prefix: str = "") -> str:
    """Markdown: one row per model, ``value [95% CI]`` per core metric of the split with `prefix`."""
    lines = ["| model | n | " + " | ".join(TABLE) + " |", "|---|---:|" + "---:|" * len(TABLE)]
    for name, m in metrics.items():
        cells = " | ".join(_cell(m, prefix + k) for k in TABLE)
        lines.append(f"| {name} | {m.get(prefix + 'n_items')} | {cells} |")
    return "\n".join(lines) + "\n"


def family_table(
    metrics: dict[str, dict],
    spread: dict[str, dict[str, dict]] | None = None,
    counts: dict[str, int] | None = None,
    pools: dict[str, str] | None = None,
) -> str:
    """Markdown: accuracy per question family for each model, beside the chance line.

    A model that gives one answer to at least 90% of a family's items is flagged ``(constant)``: its
    accuracy there is a chance line of its own. `counts` (items per family) are shown as n, `pools` (study
    or retention) label each family.
    """
    families = sorted(
        k.removeprefix("acc_")
        for k in next(iter(metrics.values()))
        if k.startswith("acc_") and not k.endswith(("_ci_low", "_ci_high"))
    )
    names = list(metrics)
    lines = [
        "| family | pool | n | chance line | " + " | ".join(names) + " |",
        "|---|---|---:|---:|" + "---:|" * len(names),
    ]
    for f in families:
        first = metrics[names[0]]
        base = first.get(f"chance_{f}")

        def flag(name: str, family: str = f) -> str:
            s = (spread or {}).get(name, {}).get(family)
            return " (constant)" if s and s["top_share"] >= 0.9 else ""

        cells = " | ".join(_cell(metrics[n], f"acc_{f}") + flag(n) for n in names)
        n = (counts or {}).get(f, "")
        pool = (pools or {}).get(f, "")
        lines.append(f"| {f} | {pool} | {n} | {'—' if base is None else f'{base:.1f}'} | {cells} |")
    return "\n".join(lines) + "\n"


ROUND_COLUMNS = ("relaxed_acc", "critic", "rouge_l", "bleu", "retain_relaxed_acc")


def rounds_table(rounds: list[dict], final: dict) -> str:
    """Markdown: per DPO round, its preference pairs and judge statistics and its model's headline metrics."""
    lines = [
        "| round | pairs | order consistency | reference agreement | " + " | ".join(ROUND_COLUMNS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(ROUND_COLUMNS),
    ]
    for r in rounds:
        pref = r["preferences"]
        evaluation = r.get("evaluation") or final  # the last round is sfte_dpo itself
        cells = " | ".join(_cell(evaluation, k) for k in ROUND_COLUMNS)
        lines.append(
            f"| {r['round']} | {pref.get('pairs_kept')} | {pref.get('order_consistency_rate')} | "
            f"{pref.get('reference_agreement')} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def significance_summary(result: dict, baseline: str) -> str:
    """Plain sentences: which differences against the baseline are significant at 5% after Holm's
    correction over the table's tests, and which are not.
    """
    lines = []
    for name, entry in result["models"].items():
        if name == baseline:
            continue

        def adjusted(d: dict) -> float | None:
            return d.get("p_holm", d["p"])

        sig = [
            f"{m} ({d['delta']:+.2f}, Holm {format_p(adjusted(d))})"
            for m, d in entry["vs_baseline"].items()
            if adjusted(d) is not None and adjusted(d) < SIGNIFICANCE
        ]
        not_sig = [
            m for m, d in entry["vs_baseline"].items() if adjusted(d) is None or adjusted(d) >= SIGNIFICANCE
        ]
        lines.append(
            f"- **{name}** vs {baseline}: significant: {', '.join(sig) or 'none'}; "
            f"not significant: {', '.join(not_sig) or 'none'}."
        )
    return "\n".join(lines) + "\n" if lines else f"Only {baseline} has been evaluated so far.\n"


def plot_metrics(metrics: dict[str, dict], path: Path) -> None:
    """Grouped bars (one group per metric, one bar per model) with 95% CI error bars, study and retention."""
    names = list(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, (prefix, title) in zip(
        axes, (("", "study test split"), ("retain_", "retention (pretrain families)"))
    ):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            m = metrics[name]
            vals = [m.get(prefix + k) or 0.0 for k in PLOTTED]
            err = [
                [max(v - (m.get(f"{prefix}{k}_ci_low") or v), 0) for k, v in zip(PLOTTED, vals)],
                [max((m.get(f"{prefix}{k}_ci_high") or v) - v, 0) for k, v in zip(PLOTTED, vals)],
            ]
            ax.bar([j + i * width for j in range(len(PLOTTED))], vals, width, yerr=err, capsize=2, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(PLOTTED))], PLOTTED, rotation=20)
        ax.set_title(title)
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("score (0–100), 95% bootstrap CI")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def read_curve(tsv: Path) -> tuple[list[int], list[float]]:
    """(steps, values) of a DVCLive metric file (``step<TAB>name`` rows)."""
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    return [int(r[0]) for r in rows], [float(r[1]) for r in rows]


# (title, the runs drawn (None: the SFT variants), metric file under <run's DVCLive folder>/plots/metrics/,
# y label): the panels of curves.png
CURVE_PANELS = (
    ("base: training loss", ("base",), "loss.tsv", "loss"),
    ("SFT variants: training loss", None, "loss.tsv", "loss"),
    ("DPO: loss (ln 2 = no preference learned)", ("sfte_dpo",), "loss.tsv", "loss"),
    ("DPO: reward margin, chosen − rejected", ("sfte_dpo",), "rewards/margins.tsv", "margin"),
)


def plot_curves(live_dir: Path, variants: list[str], path: Path) -> bool:
    """The training curves as one PNG (no network needed, unlike `dvc plots show`), x in optimizer steps.

    Panels: the base's loss, the SFT variants' losses overlaid (one line each), DPO's loss and reward
    margin. A run whose curves are missing is left out; returns False (and writes nothing) if none exist.
    """
    panels = []
    for title, names, metric, ylabel in CURVE_PANELS:
        files = [
            (n, layout.live_dir(n, live_dir) / "plots" / "metrics" / metric) for n in (names or variants)
        ]
        lines = [(n, read_curve(f)) for n, f in files if f.exists()]
        if lines:
            panels.append((title, lines, ylabel))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, lines, ylabel) in zip(axes if len(panels) > 1 else [axes], panels):
        for name, (steps, values) in lines:
            ax.plot(steps, values, label=name, linewidth=1.2)
        if title.startswith("DPO: loss"):
            ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def pick_examples(rows: list[dict], n: int) -> list[int]:
    """Indices of up to `n` items spread over the families (round-robin, in file order): deterministic."""
    by_family: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_family.setdefault(r.get("family", ""), []).append(i)
    picked: list[int] = []
    while len(picked) < min(n, len(rows)):
        for idxs in by_family.values():
            if idxs and len(picked) < n:
                picked.append(idxs.pop(0))
    return picked


def examples_page(items: dict[str, list[dict]], data_dir: Path, n: int) -> str:
    """A standalone HTML page: image, question, reference and every model's answer, side by side."""
    names = list(items)
    first = items[names[0]]
    by_id = {name: {r["id"]: r for r in rows} for name, rows in items.items()}
    out = [
        "<!doctype html><meta charset='utf-8'><title>posttrain examples</title>",
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "table{border-collapse:collapse}.ok{background:#e6ffe6}.bad{background:#ffe6e6}</style>",
        "<h1>Side-by-side examples (study test split)</h1><table><tr><th>image</th><th>question</th>"
        "<th>reference</th>" + "".join(f"<th>{html.escape(n_)}</th>" for n_ in names) + "</tr>",
    ]
    for i in pick_examples(first, n):
        row = first[i]
        img = data_dir / row["image"] if row.get("image") else None
        src = (
            f"data:image/png;base64,{base64.b64encode(img.read_bytes()).decode()}"
            if img is not None and img.exists()
            else ""
        )
        cells = []
        for name in names:
            r = by_id[name][row["id"]]
            cls = "ok" if r.get("correct") else "bad"
            cells.append(f"<td class='{cls}'>{html.escape(r['response'])}</td>")
        earlier = "".join(
            f"<small>USER: {html.escape(q)}<br>ASSISTANT: {html.escape(a)}</small><br>"
            for q, a in row.get("history", ())
        )
        out.append(
            f"<tr><td><img src='{src}' width='168'></td><td>{earlier}{html.escape(row['prompt'])}<br><small>"
            f"{html.escape(row.get('family', ''))}</small></td><td>{html.escape(row['reference'])}</td>"
            + "".join(cells)
            + "</tr>"
        )
    out.append("</table><p>Green: correct (relaxed match, or declined a negative question); red: not.</p>")
    return "\n".join(out) + "\n"


LN2 = math.log(2)


def dpo_signal_section(rounds: list[dict]) -> list[str]:
    """Markdown: DPO's training signal per round (pairs, steps, last loss, reward accuracy and margin), and
    the same measured after training on held-out pairs (`dpo.heldout_fraction`: charts never trained on).

    DPO's loss starts at ln 2 (policy = reference, every margin 0); a last loss within 0.01 of it, or a
    reward accuracy at or below one half (held-out where there is one), means the policy did not move
    towards the chosen answers, and the section says so.
    """
    lines = [
        "## DPO's training signal",
        "",
        "Training: values of the last logged step (TRL); the loss starts at ln 2 = 0.693 when the policy "
        "equals its reference. Held out: the trained policy on pairs of charts it never trained on "
        "(`dpo.heldout_fraction`); reward accuracy is the share of pairs whose chosen answer gains more "
        "log-likelihood over the reference than the rejected one.",
        "",
        "| round | pairs | steps | loss | reward accuracy | reward margin | held-out pairs | held-out loss | "
        "held-out reward accuracy | held-out margin |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []

    def cell(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    for entry in rounds:
        t = entry.get("training", {})
        h = t.get("heldout") or {}
        loss, accuracy, margin = t.get("loss"), t.get("rewards/accuracies"), t.get("rewards/margins")
        last = f" ({t['last_step_pairs']} pairs)" if accuracy is not None and "last_step_pairs" in t else ""
        lines.append(
            f"| {entry.get('round', '?')} | {t.get('pairs', 'n/a')} | {t.get('steps', 'n/a')} | "
            f"{cell(loss)} | {cell(accuracy, '{:.1%}')}{last} | {cell(margin)} | {h.get('pairs', 'n/a')} | "
            f"{cell(h.get('loss'))} | {cell(h.get('reward_accuracy'), '{:.1%}')} | "
            f"{cell(h.get('reward_margin'))} |"
        )
        judged = h.get("reward_accuracy", accuracy)
        where = "held out" if "reward_accuracy" in h else "in training"
        if loss is not None and abs(loss - LN2) < 0.01:
            notes.append(
                f"Round {entry.get('round', '?')}: the loss stayed at ln 2 ({loss:.3f}): DPO did not learn "
                "from these pairs."
            )
        elif judged is not None and judged <= 0.5:
            notes.append(
                f"Round {entry.get('round', '?')}: reward accuracy {judged:.1%} ({where}) is no better than "
                "chance."
            )
    return [*lines, "", *notes, *([""] if notes else [])]


PREFERENCE_ROWS = (
    ("prompts", "training turns sampled twice", "{:.0f}"),
    ("identical_rate", "identical candidates (never a pair)", "{:.1f}%"),
    ("dropped_truncated", "candidates cut at max_new_tokens (never a pair)", "{:.0f}"),
    ("judged_pairs", "pairs judged in both orders", "{:.0f}"),
    ("order_consistency_rate", "same verdict in both orders", "{:.1f}%"),
    ("tie_rate", "ties", "{:.1f}%"),
    ("dropped_by_keep", "decisive pairs left out by preferences.keep", "{:.0f}"),
    ("pairs_kept", "pairs kept for DPO", "{:.0f}"),
    ("reference_agreement", "kept pairs whose chosen answer ground truth also prefers", "{:.1f}%"),
    ("reference_decisive_rate", "kept pairs where ground truth prefers one answer", "{:.1f}%"),
)


def preferences_section(preferences: dict, judge: str | None) -> list[str]:
    """Markdown: the judge as a reward signal, rates as percentages, the judge named."""
    lines = [
        "## Self-critique preferences",
        "",
        f"Judge: `{judge or 'unknown'}`. How good is it as a reward signal? Agreement is with the "
        "ground-truth (reference) judge on the same pairs.",
        "",
        "| statistic | value |",
        "|---|---:|",
    ]
    for key, label, fmt in PREFERENCE_ROWS:
        value = preferences.get(key)
        lines.append(f"| {label} | {'n/a' if value is None else fmt.format(value)} |")
    if judge == "reference":
        lines += [
            "",
            "With the `reference` judge the verdicts are ground truth: agreement with the reference and "
            "order consistency are 100% by construction, not evidence of a good judge.",
        ]
    return [*lines, ""]


def unparsable_section(items: dict[str, list[dict]], n_examples: int = 2) -> list[str]:
    """Markdown: per model, how many critic replies held no score, with up to `n_examples` of them."""
    lines = [
        "## Critic replies without a score",
        "",
        "A reply counts only where the critic states a score (`posttrain.evaluate.critic.parse_score`); "
        "these items are left out of the model's critic mean and of its paired critic tests "
        "(n is shown there).",
        "",
        "| model | unparsable | examples |",
        "|---|---:|---|",
    ]
    for name, rows in items.items():
        missing = [r for r in rows if r.get("critic_score") is None]
        shown = "<br>".join(
            html.escape(" ".join(str(r.get("critic_reply", "")).split())[:160]) or "(empty)"
            for r in missing[:n_examples]
        )
        lines.append(f"| {name} | {len(missing)} of {len(rows)} | {shown} |")
    return [*lines, ""]


@dataclass(frozen=True)
class ReportInputs:
    """Where the report reads every model's evaluation, and where it writes.

    Attributes:
        models: model names in table order (each has item files and metrics).
        metrics_dir: where the report goes.
        items_dir: per-item rows, ``<split>/<name>.jsonl``, and every metric with its CI,
            ``metrics/<name>.json`` (`posttrain.evaluate.evaluation.evaluate_model`).
        data_dir: the prepared folder (images, report.json).
        live_dir: the DVCLive root (``dvclive/``; each run's folder is `posttrain.core.layout.live_dir`) whose
            training curves go into ``curves.png``; None: none.
    """

    models: list[str]
    metrics_dir: Path
    items_dir: Path
    data_dir: Path
    live_dir: Path | None = None


def read_evaluations(inputs: ReportInputs) -> tuple[dict[str, dict], dict[str, list[dict]], dict[str, dict]]:
    """Every model's metrics, its study-split rows, and its answer spread per family over both test splits.

    Returns:
        (metrics, study rows, spread), each keyed by model name in table order.
    """
    models = inputs.models
    metrics = {
        m: read_json(inputs.items_dir / "metrics" / f"{m}.json", produced_by=layout.evaluating_stage(m))
        for m in models
    }
    study = {m: read_jsonl(inputs.items_dir / "study_test" / f"{m}.jsonl") for m in models}
    retention = {m: read_jsonl(inputs.items_dir / "pretrain_test" / f"{m}.jsonl") for m in models}
    spread = {m: answer_spread(study[m] + retention[m]) for m in models}
    return metrics, study, spread


def paired_comparisons(
    study: dict[str, list[dict]], models: list[str], params: ReportParams
) -> tuple[dict, dict | None]:
    """The paired bootstrap of every model against the baseline, and against sfte where that says more.

    The second comparison (does DPO or a single variant beat the ensemble?) is made when sfte is evaluated,
    is not the baseline, and there are more than two models.

    Returns:
        (against the baseline, against sfte or None), each as `posttrain.report.compare.compare` gives it.
    """
    paired = compare(study, params.baseline, n_resamples=params.resamples, seed=params.seed)
    second = "sfte" if "sfte" in models and params.baseline != "sfte" and len(models) > 2 else None
    paired_sfte = compare(study, second, n_resamples=params.resamples, seed=params.seed) if second else None
    return paired, paired_sfte


def family_sizes(data_report: dict) -> tuple[dict[str, int], dict[str, str]]:
    """Test items per question family over both test splits, and each family's pool (study or retention).

    Args:
        data_report: the `prepare` stage's ``report.json``.
    """
    family_counts: dict[str, int] = {}
    family_pools: dict[str, str] = {}
    for split, pool in (("study_test", "study"), ("pretrain_test", "retention")):
        for family, n in data_report["splits"].get(split, {}).get("families", {}).items():
            family_counts[family] = family_counts.get(family, 0) + n
            family_pools[family] = pool
    return family_counts, family_pools


def write_figures(
    inputs: ReportInputs, metrics: dict[str, dict], study: dict[str, list[dict]], n_examples: int
) -> bool:
    """Write ``report.png``, ``curves.png`` (where there are curves) and ``examples.html`` (`n_examples`
    rows) into ``inputs.metrics_dir``.

    Returns:
        Whether ``curves.png`` was written.
    """
    plot_metrics(metrics, inputs.metrics_dir / "report.png")
    variants = [m for m in inputs.models if layout.is_variant(m)]
    curves = inputs.live_dir is not None and plot_curves(
        inputs.live_dir, variants, inputs.metrics_dir / "curves.png"
    )
    write_text_atomic(inputs.metrics_dir / "examples.html", examples_page(study, inputs.data_dir, n_examples))
    return curves


def introduction(data_report: dict, critic_is_model: bool) -> list[str]:
    """Markdown: the title, then what was measured: the data, the intervals, the critic, what is correct."""
    critic_note = (
        "Critic: the reference critic (ground-truth rubric, 0–100: declines negatives; else 60 for the right "
        "value, 20 for inventing no element, 20 × ROUGE-L recall)."
    )
    if critic_is_model:
        critic_note = (
            "Critic: LLaVA-Critic. It was trained from LLaVA-OneVision, whose data includes lrv_chart: "
            "its scores on this test set may be contaminated."
        )
    splits = data_report["splits"]
    return [
        "# posttrain report",
        "",
        f"Data: {data_report['source']}; study test {splits['study_test']['examples']} questions "
        f"({splits['study_test'].get('negatives', 0)} negative) in "
        f"{splits['study_test'].get('conversations', '?')} conversations on {splits['study_test']['images']} "
        f"images; retention test {splits['pretrain_test']['examples']} questions. Every turn is asked after "
        "its conversation's earlier turns (reference answers as history)"
        + (
            f"; {data_report['load']['duplicate_images']} conversations share an image with another, kept on "
            "one side of the split."
            if data_report.get("load", {}).get("duplicate_images")
            else "."
        ),
        "Every value is `mean [95% CI]` (percentile bootstrap for means, Wilson for proportions); scores are "
        "0–100, `loss` is NLL per answer token.",
        critic_note,
        (
            "Correctness on LRV: a response counts as a decline by its wording (`posttrain.data.declines`), "
            "but the asked element of an LRV question is not known, so the check cannot see whether a "
            "decline or an answer is about the element asked (on synthetic data it must name the asked "
            "colour)."
            if data_report.get("source") == "lrv_chart"
            else "A correct answer or decline must name the element the question asks about (its colour)."
        ),
        "",
    ]


def metrics_sections(
    metrics: dict[str, dict],
    spread: dict[str, dict[str, dict]],
    family_counts: dict[str, int],
    family_pools: dict[str, str],
) -> list[str]:
    """Markdown: the metrics tables of the study and retention splits, and accuracy per question family."""
    return [
        "## Study test split",
        "",
        metrics_table(metrics),
        "## Retention (pretrain families the base was trained on)",
        "",
        metrics_table(metrics, "retain_"),
        "## Accuracy per question family",
        "",
        "The chance line is the accuracy of the best constant answer on the test split; n is the family's "
        "test items; `(constant)` marks a model giving one answer to at least 90% of them. Intervals are "
        "Wilson 95%.",
        "",
        family_table(metrics, spread, family_counts, family_pools),
    ]


def paired_sections(paired: dict, paired_sfte: dict | None, params: ReportParams) -> list[str]:
    """Markdown: the paired deltas against the baseline with what is significant, then the same against
    sfte where `paired_comparisons` made that comparison.
    """
    lines = [
        f"## Paired bootstrap against {params.baseline} (study test split)",
        "",
        f"Same resampled items for both models ({params.resamples} resamples); two-sided p-values. "
        f"Significant means Holm-adjusted p < {SIGNIFICANCE} over the table's tests (raw p beside it).",
        "",
        format_markdown(paired, deltas_only=True),
        significance_summary(paired, params.baseline),
    ]
    if paired_sfte:
        lines += [
            "## Paired bootstrap against sfte (study test split)",
            "",
            "Does DPO (or any single variant) beat the ensemble it came from?",
            "",
            format_markdown(paired_sfte, deltas_only=True),
            significance_summary(paired_sfte, "sfte"),
        ]
    return lines


def ensemble_section(ensemble_method: str) -> list[str]:
    """Markdown: how SFTe was built (``ensemble.method``), an inexact method labelled as such."""
    exact = ensemble_method == "cat"
    return [
        "## The ensemble",
        "",
        f"SFTe was built with `ensemble.method: {ensemble_method}`: "
        + (
            "the exact average of the SFT models (concatenated ranks, weights 1/N)."
            if exact
            else "NOT the exact average model (see `posttrain.train.ensemble`); compare with `cat`."
            if ensemble_method == "linear"
            else "an approximation of the average model."
        ),
        "",
    ]


def dpo_rounds_section(dpo_rounds: list[dict], final: dict) -> list[str]:
    """Markdown: the table of DPO rounds (`rounds_table`); `final`: sfte_dpo's metrics, the last round's."""
    return [
        "## DPO rounds",
        "",
        "Each round samples from the previous round's model, judges and trains again; "
        "the last round is sfte_dpo. Values are `mean [95% CI]` on the study test split.",
        "",
        rounds_table(dpo_rounds, final),
        "",
    ]


def write_report_files(
    metrics_dir: Path, text: str, baseline: str, paired: dict, paired_sfte: dict | None
) -> None:
    """Write ``report.md`` (`text`) and ``report_compare.json``: every paired comparison of the report, keyed
    by what it is against (`posttrain seeds` reads them).
    """
    write_text_atomic(metrics_dir / "report.md", text)
    against = {baseline: paired["models"], **({"sfte": paired_sfte["models"]} if paired_sfte else {})}
    write_text_atomic(metrics_dir / "report_compare.json", json.dumps({"against": against}, indent=2) + "\n")


def build_report(
    inputs: ReportInputs,
    params: ReportParams,
    *,
    critic_is_model: bool = False,
    ensemble_method: str | None = None,
    preferences: dict | None = None,
    dpo_rounds: list[dict] | None = None,
    judge: str | None = None,
) -> str:
    """Write ``report.md``, ``report_compare.json``, ``report.png``, ``curves.png`` and ``examples.html`` into
    ``inputs.metrics_dir``.

    Args:
        inputs: the models in table order and the folders the report reads and writes.
        params: the validated `report` params section: the baseline every paired delta is taken against,
            the rows on the examples page, and the bootstrap resamples and seed of the paired deltas.
        critic_is_model: True when the critic scores came from LLaVA-Critic (adds the contamination caveat).
        ensemble_method: how SFTe was built (``ensemble.method``); an inexact one is labelled as such.
        preferences: the `preferences` stage's statistics, if it ran.
        dpo_rounds: the `dpo` stage's rounds (from its provenance); with more than one, a table per round.
        judge: the preference judge (``preferences.judge``), named beside its statistics.

    Returns:
        The markdown of ``report.md``.
    """
    if params.baseline not in inputs.models:
        raise ValueError(
            f"report.baseline {params.baseline!r} is not among the evaluated models {inputs.models}"
        )
    metrics, study, spread = read_evaluations(inputs)
    paired, paired_sfte = paired_comparisons(study, inputs.models, params)
    data_report = read_json(inputs.data_dir / "report.json", produced_by="prepare")
    family_counts, family_pools = family_sizes(data_report)
    curves = write_figures(inputs, metrics, study, params.examples)

    md = [
        *introduction(data_report, critic_is_model),
        *metrics_sections(metrics, spread, family_counts, family_pools),
        *paired_sections(paired, paired_sfte, params),
    ]
    if critic_is_model or any(r.get("critic_score") is None for rows in study.values() for r in rows):
        md += unparsable_section(study)
    if ensemble_method:
        md += ensemble_section(ensemble_method)
    if preferences:
        md += preferences_section(preferences, judge)
    if dpo_rounds and "sfte_dpo" in metrics:
        md += dpo_signal_section(dpo_rounds)
    if dpo_rounds and len(dpo_rounds) > 1 and "sfte_dpo" in metrics:
        md += dpo_rounds_section(dpo_rounds, metrics["sfte_dpo"])
    md += [
        "![metrics](report.png)",
        "",
        *(["Training curves (x: optimizer step): ![curves](curves.png)", ""] if curves else []),
        "Side-by-side examples: [examples.html](examples.html)",
        "",
    ]
    text = "\n".join(md)
    write_report_files(inputs.metrics_dir, text, params.baseline, paired, paired_sfte)
    return text
