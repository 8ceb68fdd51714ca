"""The real study's preset (configs/study.yaml) and `posttrain pin`, which fills in its open revisions."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from posttrain.__main__ import main as cli
from posttrain.core.config import (
    BatchSize,
    CriticKind,
    DataSource,
    Judge,
    ModelKind,
    ParamsError,
    Quantization,
    load_params,
)
from posttrain.realscale.pin import COMMIT, hub_sources, main, pin_file

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "study.yaml"
DATASET_SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """`HfApi.repo_info` for a dataset whose "main" is at DATASET_SHA; records the calls."""

    def __init__(self):
        self.calls = []

    def repo_info(self, repo_id, repo_type, revision):
        self.calls.append((repo_id, repo_type, revision))
        return SimpleNamespace(sha=DATASET_SHA)


def test_preset_is_complete_except_the_dataset_pin():
    with pytest.raises(ParamsError) as e:
        load_params(PRESET)
    assert e.value.problems == [
        "prepare.lrv.revision: empty; pin a dataset commit, or set prepare.lrv.local_parquet"
    ]
    data = yaml.safe_load(PRESET.read_text())
    assert COMMIT.fullmatch(data["base"]["revision"])
    assert set(data) == set(yaml.safe_load((ROOT / "params.yaml").read_text())), "every section spelt out"


def test_pin_resolves_the_open_dataset_revision_and_the_result_is_the_study(tmp_path):
    hub = FakeHub()
    out = tmp_path / "params.yaml"
    changes = pin_file(PRESET, out, api=hub)
    assert hub.calls == [("lmms-lab/LLaVA-OneVision-Data", "dataset", "main")]  # base is pinned already
    assert [(c.key, sha) for c, sha in changes] == [("prepare.lrv.revision", DATASET_SHA)]
    p = load_params(out)
    assert p.base.model is ModelKind.HUB and p.base.hub_id == "llava-hf/llava-1.5-7b-hf"
    assert p.prepare.source is DataSource.LRV_CHART and p.prepare.lrv.revision == DATASET_SHA
    assert p.prepare.lrv.test_images == 200  # the study's 1.6k/0.2k split
    sft = p.sft
    assert sft.common.quantization is Quantization.NF4 and sft.common.rank == 16
    assert {n: (v.alpha, v.dropout) for n, v in sft.variants.items()} == {
        "sft1": (16.0, 0.05),
        "sft2": (8.0, 0.05),
        "sft3": (16.0, 0.10),
        "sft4": (8.0, 0.10),
    }
    # the memory check picks the micro-batch; gradient accumulation keeps the recipe's effective batch
    assert sft.common.batch_size is BatchSize.AUTO and sft.common.gradient_accumulation == 1
    assert p.dpo.batch_size is BatchSize.AUTO and p.dpo.gradient_accumulation == 1
    assert (sft.common.effective_batch, p.dpo.effective_batch) == (12, 16)
    # generation sizes itself to the card (an 80 GB H100 ran out of memory at a fixed 64 prompts × 2 samples)
    assert p.preferences.batch_size is BatchSize.AUTO and p.evaluate.batch_size is BatchSize.AUTO
    # 5 epochs of the ~1,580 train conversations (LRV Chart: 1,776 rows, 200 test images)
    epochs = sft.common.max_steps * sft.common.effective_batch / 1580
    assert 4.9 < epochs < 5.1
    assert p.preferences.judge is Judge.SELF and p.preferences.max_prompts == 1000
    assert p.evaluate.critic.kind is CriticKind.LLAVA_CRITIC and p.evaluate.critic.model
    # comments survive the rewrite; only the revision line changed
    before, after = PRESET.read_text().splitlines(), out.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1 and DATASET_SHA in changed[0][1]


def test_pin_leaves_commits_alone_and_skips_local_sources(tmp_path):
    data = yaml.safe_load(PRESET.read_text())
    data["prepare"]["lrv"]["revision"] = DATASET_SHA
    src = tmp_path / "pinned.yaml"
    src.write_text(yaml.safe_dump(data))
    hub = FakeHub()
    assert pin_file(src, tmp_path / "out.yaml", api=hub) == [] and hub.calls == []  # commits: no hub call

    data["base"]["revision"] = "main"  # a branch is not a pin
    assert {s.key: s.revision for s in hub_sources(data)} == {
        "base.revision": "main",
        "prepare.lrv.revision": DATASET_SHA,
    }
    data["base"]["hub_id"] = str(tmp_path)  # local folder and local parquet: nothing to pin
    data["prepare"]["lrv"]["local_parquet"] = str(tmp_path / "x.parquet")
    assert hub_sources(data) == []


def test_pin_command_reports_a_hub_failure_in_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", offline)
    assert main([str(PRESET), str(tmp_path / "out.yaml")]) == 2
    assert "could not resolve a revision" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda t: t.replace("  beta: 0.1 ", "  beta: -1.0 ", 1), "dpo.beta: must be > 0, got -1.0"),
        (lambda t: t.replace("dpo:", "dpo: [", 1), "not valid YAML"),
        (lambda t: t + "dpo:\n  beta: 0.2\n", "dpo: given twice"),
    ],
)
def test_pin_validates_before_it_writes(tmp_path, monkeypatch, capsys, edit, fragment):
    """A params file with a problem is reported with exit status 1, and the destination keeps its content."""
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, *a, **k: hub.repo_info(*a, **k))
    src, dst = tmp_path / "study.yaml", tmp_path / "params.yaml"
    src.write_text(edit(PRESET.read_text()))
    assert src.read_text() != PRESET.read_text()
    dst.write_text("the params.yaml in use\n")
    assert cli(["pin", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert fragment in err and "could not resolve" not in err and "Traceback" not in err
    assert dst.read_text() == "the params.yaml in use\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "study.yaml"]  # no temporary left
