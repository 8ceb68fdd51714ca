"""Stand-in hub files (posttrain.realscale.standin) and the real-scale path end to end on them
(posttrain.realscale.e2e)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from posttrain.data.lrv import flatten_rows, load_lrv_rows
from posttrain.models.architectures import load_config, shrink
from posttrain.realscale.standin import (
    LLAVA_SPECIALS,
    QWEN2_SPECIALS,
    build_llava,
    emphasise_learned_tokens,
    learned_token_ids,
    standin_tokenizer,
    write_llava,
    write_lrv_parquet,
)

TEXTS = ["What is the value of the red bar? The red bar has a value of 7."] * 5


@pytest.mark.parametrize("specials, bos", [(LLAVA_SPECIALS, "<s>"), (QWEN2_SPECIALS, None)])
def test_standin_tokenizer_puts_specials_at_the_real_ids(specials, bos):
    eos = "</s>" if bos else "<|im_end|>"
    pad = "<pad>" if bos else "<|endoftext|>"
    tok = standin_tokenizer(TEXTS, specials, bos=bos, eos=eos, pad=pad, unk="<unk>" if bos else None)
    assert len(tok) == max(specials.values()) + 1
    assert {t: tok.convert_tokens_to_ids(t) for t in specials} == specials
    ids = tok("The red bar <image> has 7.")["input_ids"]
    assert ids.count(specials["<image>"]) == 1  # never merged with text
    assert (ids[0] == specials[bos]) if bos else (ids[0] not in specials.values())
    learned = learned_token_ids(tok)
    assert set(ids) - set(specials.values()) <= set(learned)  # text never encodes to a filler
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "Theredbarhas7."


def test_lrv_parquet_has_the_dataset_schema_and_loads(tmp_path):
    path = write_lrv_parquet(tmp_path / "lrv.parquet", images=6, size=336)
    table = pq.read_table(path)
    assert table.column_names == ["id", "image", "conversations", "data_source"]
    rows = list(load_lrv_rows(str(path), "h", "lrv_chart", "", "train"))
    examples, report = flatten_rows(rows, tmp_path / "images")
    assert len(examples) >= 6 and not report.get("skipped")
    from PIL import Image

    assert Image.open(tmp_path / "images" / Path(examples[0].image).name).size == (336, 336)


def test_lrv_parquet_has_followups_duplicates_and_lrv_declines(tmp_path):
    """The stand-in is shaped like the hub data: conversations with follow-ups, LRV declines, repeats."""
    from posttrain.realscale.standin import LRV_DECLINES

    path = write_lrv_parquet(tmp_path / "lrv.parquet", images=24, size=112, duplicates=3)
    rows = list(load_lrv_rows(str(path), "h", "lrv_chart", "", "train"))
    examples, report = flatten_rows(rows, tmp_path / "images")
    assert report["rows_kept"] == 24 + 3 + 1 and report["images"] == 24
    assert report["duplicate_images"] == 4 and report["repeated_ids"] == 1  # 3 copies, 1 repeated id
    followups = [e for e in examples if e.question.startswith("And the ")]
    assert followups and all(e.history for e in followups)
    negatives = [e for e in examples if e.negative]
    assert negatives and report["negatives"] == len(negatives)
    stems = {d.split("{")[0] for d in LRV_DECLINES}
    assert all(not e.answer.startswith("There is no ") for e in negatives)  # LRV's wordings, not ours
    assert len({s for s in stems if any(e.answer.startswith(s) for e in negatives)}) >= 3


def test_emphasised_rows_are_sampled(tmp_path):
    config = shrink(load_config("llava-1.5-7b"))
    folder = write_llava(tmp_path / "llava", config, TEXTS)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder)
    tok = AutoProcessor.from_pretrained(folder).tokenizer
    learned = learned_token_ids(tok)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == 32000
    head = model.get_output_embeddings().weight
    others = torch.ones(head.shape[0], dtype=torch.bool)
    others[learned] = False
    # the learned rows were scaled ×3: their norms stand out from the filler rows'
    assert head[learned].norm(dim=1).mean() > 2.5 * head[others].norm(dim=1).mean()
    before = head[learned].clone()
    emphasise_learned_tokens(model, learned, factor=2.0)
    assert torch.allclose(head[learned], 2 * before)


def test_a_wide_standin_ends_varied_answers_on_generation_prompts():
    """At 7B width a random tower's hidden states are chaotic and its samples few byte tokens: 96 H100
    samples held no sentence end, so nothing stopped and no preference pair formed. At hidden size 1024 the
    CPU shows the same. The stand-in (`build_llava`: led by the current token, ends sampled at a set rate,
    EOS taught after them) must end varied, non-empty answers on prompts it was not taught on."""
    from posttrain.evaluate.generation import generate
    from posttrain.models.template import encode_prompt

    texts = [
        f"USER: ASSISTANT: What is bar {i}? The bar {i} has a value of {7 * i}. Is it red! No."
        for i in range(40)
    ]
    wide = dict(text_hidden_size=1024, text_intermediate_size=2048, text_num_attention_heads=16)
    config = shrink(load_config("llava-1.5-7b"), vision_image_size=56, **wide)
    model, tok, eos = build_llava(config, texts, dtype=torch.float32)
    assert eos["p_end_at_prompt_end"] < 0.01 and eos["p_eos_at_prompt_end"] < 0.01
    assert abs(eos["p_end_after_other"] - 0.1) < 0.03 and eos["p_eos_after_end"] > 0.3
    prompts = [encode_prompt(tok, [], f"How tall is the bar {i} and what colour?", 16) for i in range(16)]
    g = torch.Generator().manual_seed(5)
    pixels = [torch.randn(3, 56, 56, generator=g) for _ in prompts]
    pairs = generate(
        model.eval(),
        tok,
        pixels,
        prompts,
        batch_size=16,
        max_new_tokens=24,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        samples=2,
        with_ends=True,
    )
    samples = [s for pair in pairs for s in pair]
    assert all(text for text, _ in samples)  # none empty
    ended = [len(tok.encode(text, add_special_tokens=False)) for text, stopped in samples if stopped]
    assert len(ended) >= 0.75 * len(samples)
    assert len(set(ended)) >= 8  # lengths vary
    assert sum(a != b for (a, _), (b, _) in pairs) >= 14


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """The study preset's stages on shrunk stand-ins on the CPU: `python -m posttrain e2e WORK --shrink`."""
    from posttrain.realscale.e2e import main

    work = tmp_path_factory.mktemp("e2e")
    assert main([str(work), "--shrink"]) == 0
    return work


# the stages of the e2e smoke run, in dvc.yaml's order (the preset with its two smoke variants)
SMOKE_STAGES = [
    "prepare",
    "base",
    "sft@sft1",
    "sft@sft2",
    "ensemble",
    "preferences",
    "dpo",
    "evaluate@base",
    "evaluate@sfte",
    "evaluate@sfte_dpo",
    "evaluate_sft@sft1",
    "evaluate_sft@sft2",
    "report",
]


@pytest.mark.slow
def test_e2e_runs_every_stage_of_the_study_preset_on_standins(e2e_run):
    summary = json.loads((e2e_run / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == set(SMOKE_STAGES)
    checks = summary["checks"]
    assert checks["image_tokens"] == 576 and checks["train_sequence_tokens"]["min"] > 576
    # one training sequence per conversation: fewer sequences than turns, every answer supervised
    assert checks["train_conversations"] < checks["train_turns"]
    ensemble = dict(checks["ensemble"])
    assert ensemble.pop("max_relative_delta_error") < 1e-6
    assert ensemble == {"exact_average": True, "members": ["sft1", "sft2"], "method": "cat", "rank": 32}
    assert checks["preferences"]["pairs_kept"] >= 2
    changed, total = map(int, checks["dpo_tensors_changed"].split("/"))
    assert changed == total > 0
    assert checks["test_items"] > 0 and checks["critic_parsed_items"] <= checks["test_items"]
    # batch_size auto on the CPU: the whole effective batch of 4, within the rows
    assert checks["sft_batch"] == {"micro_batch": 4, "gradient_accumulation": 1}
    dpo_batch = checks["dpo_training"]["batch"]
    assert dpo_batch["micro_batch"] * dpo_batch["gradient_accumulation"] == 4
    # the params the stages ran with are the study preset's, apart from the smoke overrides
    import yaml

    params = yaml.safe_load((e2e_run / "params.yaml").read_text())
    assert params["preferences"]["temperature"] == 0.7 and params["sft"]["common"]["rank"] == 16
    assert params["evaluate"]["critic"]["kind"] == "llava_critic"
    assert (e2e_run / "metrics" / "report.md").read_text().count("sfte_dpo") > 0


@pytest.mark.slow
def test_e2e_rerun_skips_finished_stages(e2e_run, capsys):
    from posttrain.realscale.e2e import main

    (e2e_run / "metrics" / "report.md").unlink()
    assert main([str(e2e_run), "--shrink"]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 12 and "[e2e] report: " in out


@pytest.mark.slow
def test_e2e_under_two_processes_runs_every_stage(tmp_path):
    """`e2e --shrink --processes 2`: the sharded stages under torchrun (gloo), the command the multi-GPU
    measurement runs; the stages' own options (``--logs``) reach them."""
    from posttrain.realscale.e2e import main

    assert main([str(tmp_path), "--shrink", "--processes", "2"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "evaluate@sfte_dpo" in summary["stage_seconds"] and summary["checks"]["test_items"] > 0
    log = (tmp_path / "e2e.log").read_text()
    assert "ambiguous option" not in log
    assert (tmp_path / "logs" / "sft1.json").is_file(), "the stage's --logs must have reached it"


def test_the_plan_is_dvc_yaml_rendered_with_the_smoke_params(tmp_path):
    """Every stage of dvc.yaml, in its order, for the smoke run's two variants; commands run this checkout's
    scripts with this interpreter, through the launcher unless --direct."""
    import sys

    from posttrain.realscale.e2e import ROOT, command, plan, write_params

    (tmp_path / "hub" / "llava-1.5-7b").mkdir(parents=True)
    write_params(tmp_path, cuda=False)
    steps = plan(tmp_path)
    assert [s.name for s in steps] == SMOKE_STAGES
    sft2 = steps[3]
    assert tmp_path / "models" / "sft" / "sft2" in sft2.outputs
    script = str(ROOT / "stages" / "sft.py")
    assert command(sft2) == [sys.executable, "-m", "posttrain.launch", script, "--variant", "sft2"]
    assert command(sft2, direct=True) == [sys.executable, script, "--variant", "sft2"]


@pytest.mark.parametrize("cuda", [False, True])
def test_the_smoke_params_keep_batch_size_auto_and_validate(tmp_path, cuda):
    from posttrain.core.config import BatchSize, load_params
    from posttrain.realscale.e2e import write_params

    (tmp_path / "hub" / "llava-1.5-7b").mkdir(parents=True)  # a local base folder needs no revision
    p = load_params(write_params(tmp_path, cuda))
    for section in (p.sft.common, p.dpo):
        assert section.batch_size is BatchSize.AUTO
        assert (section.effective_batch, section.gradient_accumulation) == (4, 1)


def test_the_measure_params_keep_the_presets_batches_and_answer_lengths(tmp_path):
    """`e2e --measure` changes sizes of work, never what sets a rate: batches, answer lengths, nf4, Liger."""
    import yaml

    from posttrain.core.config import Quantization, load_params
    from posttrain.realscale.e2e import MEASURE_PROMPTS, MEASURE_SFT_STEPS, PRESET, write_params

    (tmp_path / "hub" / "llava-1.5-7b").mkdir(parents=True)
    measured = load_params(write_params(tmp_path, cuda=True, measure=True))
    preset = yaml.safe_load(PRESET.read_text())
    common, sft = measured.sft.common, preset["sft"]["common"]
    assert common.max_steps == MEASURE_SFT_STEPS and measured.preferences.max_prompts == MEASURE_PROMPTS
    assert (common.batch_size.value, common.effective_batch) == (sft["batch_size"], sft["effective_batch"])
    assert common.quantization is Quantization.NF4 and common.liger
    for section in ("preferences", "evaluate"):
        for key in ("batch_size", "max_new_tokens"):
            assert getattr(getattr(measured, section), key) == preset[section][key], (section, key)


def test_e2e_stage_rates_read_the_stages_logs(tmp_path):
    from posttrain.realscale.e2e import stage_rates

    logs = tmp_path / "logs"
    logs.mkdir()
    for v, rate in (("sft1", 10.0), ("sft2", 12.0)):
        (logs / f"{v}.json").write_text(json.dumps({"samples_per_s": rate, "samples_per_step": 12}))
    for m, (tokens, seconds) in (("base", (100, 2.0)), ("sfte", (300, 2.0))):
        generate = {"seconds": seconds, "prompts": 4, "rows": 4, "prompt_tokens": 40, "new_tokens": tokens}
        generate["computed_tokens"] = 4 * 128  # every row decoded 128 positions, EOS or not
        (logs / f"evaluate_{m}.json").write_text(json.dumps({"generate": generate}))
    rates = stage_rates(tmp_path)  # sfte_dpo and preferences did not run: their parts are left out
    assert rates["sft_samples_per_s"] == 11.0 and rates["sft_effective_batch"] == 12
    assert rates["evaluate_generate"]["new_tokens_per_s"] == 100.0  # 400 tokens in 4 s, pooled
    assert rates["evaluate_generate"]["computed_tokens_per_s"] == 256.0  # 1,024 row positions in 4 s
    assert rates["preferences_generate"] is None and rates["evaluate_score"] is None
    assert rates["preferences_judge"] is None

    judge = {"seconds": 4.0, "prompts": 10, "tokens": 9000}  # the self-judge's pairwise prompts
    (logs / "preferences.json").write_text(json.dumps({"judge": judge}))
    assert stage_rates(tmp_path)["preferences_judge"]["prompts_per_s"] == 2.5


def test_the_projection_costs_self_judging_at_the_stage_measured_rate():
    """bench/gpu.py projects the preset's preferences from the judge's measured pairwise prompts/s; a summary
    from before the judge logged its rate falls back to scoring 3 whole sequences per order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).parents[1] / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    preset = gpu.study_preset()
    prefs = preset.preferences
    rates = dict(
        sft_samples_per_s=20.0, sft_effective_batch=12, generate_tokens_per_s=1000.0,
        sample_tokens_per_s=2000.0, score_tokens_per_s=25000.0, stage_startup_s=30.0,
        dpo_pairs_per_s=7.0, critic_items_per_s=6.0,
    )  # fmt: skip
    sampling = prefs.max_prompts * 2 * prefs.max_new_tokens / 2000.0
    old = gpu.project(preset, rates)["preferences"]
    assert old == round((sampling + prefs.max_prompts * 6 * gpu.JUDGE_SEQUENCE_TOKENS / 25000.0) / 60, 1)
    new = gpu.project(preset, {**rates, "judge_prompts_per_s": 40.0})["preferences"]
    assert new == round((sampling + prefs.max_prompts * 2 / 40.0) / 60, 1) < old


def test_e2e_refuses_full_size_without_cuda(tmp_path, capsys):
    from posttrain.realscale.e2e import main

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert main([str(tmp_path)]) == 2
    assert "--shrink" in capsys.readouterr().err
