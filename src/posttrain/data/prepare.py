"""The `prepare` stage's work: build the four splits of the shared example format in one folder."""

from __future__ import annotations

from pathlib import Path

from posttrain.core.config import DataSource, PrepareParams, to_dict
from posttrain.core.io import atomic_dir, write_json_atomic
from posttrain.data.charts import generate_pool
from posttrain.data.examples import Example, family_counts, split_by_image, write_examples


def duplicate_counts(splits: dict[str, list[Example]]) -> dict:
    """Conversations and distinct images over all splits; conversations whose image an earlier one has."""
    conversations = {e.conversation: e.image_id for examples in splits.values() for e in examples}
    images = set(conversations.values())
    return {
        "conversations": len(conversations),
        "images": len(images),
        "duplicate_images": len(conversations) - len(images),
    }


def _synthetic(params: PrepareParams, image_dir: Path) -> tuple[dict[str, list[Example]], dict]:
    s = params.synthetic
    splits = {}
    for pool in ("pretrain", "study"):
        examples = generate_pool(
            pool,
            getattr(s, f"{pool}_images"),
            s.image_size,
            s.questions_per_image,
            s.negative_fraction,
            params.seed,
            image_dir,
            s.followup_fraction,
            s.captions,
            s.presence,
        )
        key = f"{pool}_test_images"
        train, test = split_by_image(examples, getattr(s, key), params.seed, f"prepare.synthetic.{key}")
        splits[f"{pool}_train"], splits[f"{pool}_test"] = train, test
    # The pools are drawn independently, so a small chart can come up in both: a chart in either test split
    # is never trained on, by the base or by SFT.
    test_images = {e.image_id for name in ("pretrain_test", "study_test") for e in splits[name]}
    for name in ("pretrain_train", "study_train"):
        splits[name] = [e for e in splits[name] if e.image_id not in test_images]
    return splits, {"rows_read": None, "skipped": {}, **duplicate_counts(splits)}


def _lrv(params: PrepareParams, image_dir: Path) -> tuple[dict[str, list[Example]], dict]:
    from posttrain.data.lrv import check_bad_fraction, flatten_rows, load_lrv_rows

    lrv = params.lrv
    rows = load_lrv_rows(lrv.local_parquet, lrv.hub_id, lrv.config, lrv.revision, lrv.split)
    examples, report = flatten_rows(rows, image_dir)
    check_bad_fraction(report, params.max_bad_fraction)
    train, test = split_by_image(examples, lrv.test_images, params.seed, "prepare.lrv.test_images")
    # The base (llava-1.5) was post-trained elsewhere: there is no pretrain pool, so no retention split.
    return {"pretrain_train": [], "pretrain_test": [], "study_train": train, "study_test": test}, report


def prepare_data(params: PrepareParams, out_dir: str | Path) -> dict:
    """Write the prepared folder (see `posttrain.data.examples`) atomically and return its report.

    Args:
        params: the validated ``prepare`` section.
        out_dir: the folder to (re)create, e.g. ``data/prepared``.

    Returns:
        The report also written to ``out_dir/report.json``: example and image counts per split and family,
        and the rows skipped with their reasons.
    """
    with atomic_dir(out_dir) as tmp:
        image_dir = tmp / "images"
        image_dir.mkdir()
        build = _synthetic if params.source is DataSource.SYNTHETIC else _lrv
        splits, load_report = build(params, image_dir)
        report = {"source": params.source.value, "params": to_dict(params), "load": load_report, "splits": {}}
        for name, examples in splits.items():
            write_examples(tmp / f"{name}.jsonl", examples)
            report["splits"][name] = {
                "examples": len(examples),
                "conversations": len({e.conversation for e in examples}),
                "images": len({e.image_id for e in examples}),
                "negatives": sum(e.negative for e in examples),
                "turns_with_history": sum(e.turn > 0 for e in examples),
                "families": family_counts(examples),
            }
        write_json_atomic(tmp / "report.json", report)
    return report
