"""The real-scale path end to end: every stage of the study preset, run on stand-ins of the hub files.

    python -m posttrain e2e WORKDIR            # the 7B architectures: CUDA GPU, ~35 GB of disk
    python -m posttrain e2e WORKDIR --shrink   # the same architectures shrunk to 2 layers: CPU, minutes
    python -m posttrain e2e WORKDIR --measure  # the stages' own rates at the preset's batches (GPU)

Writes into WORKDIR (`posttrain.realscale.standin`) an LRV Chart parquet at 336 px and LLaVA-1.5-7B and
LLaVA-Critic folders with random weights, then WORKDIR/params.yaml: `configs/study.yaml` with the stand-ins'
paths, two SFT variants and sizes cut to a smoke run (`smoke_overrides`). It runs every stage of `dvc.yaml`,
rendered with that file (`plan`), in WORKDIR and in the file's order, each command as its own process as
`dvc repro` would, then checks what the stages wrote (`check_outputs`) and writes WORKDIR/summary.json. A
stage whose outputs all exist is skipped, so a rerun resumes after the last stage that finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.core.layout import model_dir, pipeline_models

ROOT = Path(__file__).resolve().parents[3]
PIPELINE = ROOT / "dvc.yaml"
PRESET = ROOT / "configs" / "study.yaml"
VARIANTS = ("sft1", "sft2")  # the preset's variants the smoke run keeps
IMAGES = 40  # charts in the parquet (~100 questions); 6 of them form the test split
# --measure: enough data for the stages' own rates at the preset's batches and answer lengths
# (the first version, 200 charts, 24 steps and 64 prompts, timed one or two generation batches: a rate that
# is mostly the first batch's warm-up, which a study of 1,000 prompts pays once)
MEASURE_IMAGES, MEASURE_TEST_IMAGES = 340, 140  # ~260 test turns: five evaluation batches of 64
MEASURE_SFT_STEPS = 48  # the rate is taken over the steps after the first two
MEASURE_PROMPTS = 192  # three preference batches: 64 prompts, two samples each


@dataclass(frozen=True)
class Step:
    """One stage run: its name and command as `dvc.yaml` renders them, and the outputs that mark it done."""

    name: str
    cmd: tuple[str, ...]  # the command's words: python -m posttrain.launch stages/<stage>.py [options]
    outputs: tuple[Path, ...]


def measure_overrides(work: Path) -> dict:
    """What a --measure run changes in the study preset: the stand-ins' paths and fewer steps and prompts.

    Batch sizes, answer lengths, quantization and kernels stay the preset's, so the stages' logged rates
    (`posttrain.train.checkpoints.StepTimes`, `posttrain.evaluate.generation.throughput`) are the study's.
    """
    return {
        "base": {"hub_id": str(work / "hub" / "llava-1.5-7b"), "revision": ""},
        "prepare": {
            "lrv": {
                "local_parquet": str(work / "hub" / "lrv_chart.parquet"),
                "test_images": MEASURE_TEST_IMAGES,
            }
        },
        "sft": {"common": {"max_steps": MEASURE_SFT_STEPS, "save_steps": 0, "warmup_steps": 0}},
        "preferences": {"judge": "reference", "max_prompts": MEASURE_PROMPTS, "min_pairs": 2},
        "dpo": {"epochs": 1.0, "warmup_steps": 0},
        # the critic's rate is bench/gpu.py's (LLaVA-Critic through the evaluation's judge)
        "evaluate": {"resamples": 100, "critic": {"kind": "reference"}},
        "report": {"examples": 4, "resamples": 100},
    }


def smoke_overrides(work: Path, cuda: bool) -> dict:
    """What the smoke run changes in the study preset: the stand-ins' paths, and sizes of seconds.

    Everything else (nf4 on CUDA, the template, LoRA targets, the judge, the critic prompts) stays as the
    study runs it. The batches stay ``auto``, with smaller effective batches: the memory check picks the
    micro-batch as in the study.
    """
    return {
        "base": {"hub_id": str(work / "hub" / "llava-1.5-7b"), "revision": ""},
        "prepare": {"lrv": {"local_parquet": str(work / "hub" / "lrv_chart.parquet"), "test_images": 6}},
        "sft": {
            "common": {
                "quantization": "nf4" if cuda else "none",
                "liger": cuda,
                "max_steps": 2,
                "batch_size": "auto",
                "effective_batch": 4,
                "gradient_accumulation": 1,
                "save_steps": 0,
                "warmup_steps": 0,
            },
        },
        "preferences": {
            "judge": "reference",  # random weights cannot judge; the reference judge ranks their samples
            # every train prompt (~85): the stand-in's samples end after sentence ends (build_llava), but
            # random text rarely shares a word with the reference, so most pairs tie and are dropped
            "max_prompts": 0,
            "max_new_tokens": 24,
            "min_pairs": 2,
        },
        "dpo": {
            "epochs": 1.0,
            "batch_size": "auto",
            "effective_batch": 4,
            "gradient_accumulation": 1,
            "warmup_steps": 0,
        },
        "evaluate": {
            "max_new_tokens": 16,
            "resamples": 100,
            "critic": {"model": str(work / "hub" / "llava-critic-7b"), "batch_size": 4, "max_new_tokens": 16},
        },
        "report": {"examples": 4, "resamples": 100},
    }


def merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied recursively (mappings merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict):
            out[key] = merge(out.get(key) or {}, value)
        else:
            out[key] = value
    return out


def write_params(
    work: Path, cuda: bool, preset: Path = PRESET, measure: bool = False, processes: int = 1
) -> Path:
    """Write and validate WORKDIR/params.yaml: the preset with `smoke_overrides` (`measure_overrides`) and
    ``launch.processes``.
    """
    from posttrain.core.config import parse_params

    changes = measure_overrides(work) if measure else smoke_overrides(work, cuda)
    changes["launch"] = {"processes": processes}
    data = merge(yaml.safe_load(preset.read_text()), changes)
    data["sft"]["variants"] = {k: v for k, v in data["sft"]["variants"].items() if k in VARIANTS}
    parse_params(data, str(preset))  # raises ParamsError naming every bad key
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_standins(work: Path, shrink: bool, device: str, images: int = IMAGES, critic: bool = True) -> dict:
    """The stand-in hub files: `images` charts as a parquet, LLaVA-1.5 and LLaVA-Critic (kept if present)."""
    import pyarrow.parquet as pq

    from posttrain.evaluate.critic import pairwise_prompt, pointwise_prompt
    from posttrain.models.architectures import load_config
    from posttrain.models.architectures import shrink as shrunk
    from posttrain.realscale.standin import write_critic, write_llava, write_lrv_parquet

    hub = work / "hub"
    timings = {}
    t0 = time.perf_counter()
    parquet = hub / "lrv_chart.parquet"
    if not parquet.exists():
        write_lrv_parquet(parquet, images, size=336)
    texts = [
        " ".join(t["value"] for t in row)
        for row in pq.read_table(parquet).column("conversations").to_pylist()
    ]
    texts = [f"USER: ASSISTANT: {t}" for t in texts]
    timings["parquet_s"] = round(time.perf_counter() - t0, 1)
    models = [("llava-1.5-7b", write_llava, [])]
    if critic:
        models.append(
            ("llava-critic-7b", write_critic, [pointwise_prompt("Q", "R"), pairwise_prompt("Q", "A", "B")])
        )
    for name, write, extra in models:
        folder = hub / name
        if (folder / "config.json").exists():
            continue
        t0 = time.perf_counter()
        config = load_config(name)
        if shrink:
            config = shrunk(config)
        tmp = folder.with_name(folder.name + ".tmp")
        write(tmp, config, texts + extra, device=device)
        tmp.rename(folder)
        timings[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        print(f"stand-in {name} written in {timings[f'{name}_s']}s", flush=True)
    return timings


def _paths(entries: list) -> list[str]:
    """The paths of a rendered stage's ``outs``/``metrics`` list (an entry is a path or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def plan(work: Path) -> list[Step]:
    """Every stage of `dvc.yaml`, rendered with WORKDIR/params.yaml (``foreach`` over its variants), in the
    file's order, which is the pipeline's; the commands run in WORKDIR, so their default paths are WORKDIR's.
    A stage's outputs mark it done, its training curves (``dvclive/``) aside: the preset's hub base trains
    nothing and draws none.
    """
    from dvc.parsing import DataResolver
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:  # its filesystem and parsing config; `vars` come from WORKDIR/params.yaml
        rendered = DataResolver(repo, str(work), yaml.safe_load(PIPELINE.read_text())).resolve()["stages"]
    return [
        Step(
            name,
            tuple(shlex.split(stage["cmd"])),
            tuple(
                work / p
                for p in _paths(stage.get("outs", [])) + _paths(stage.get("metrics", []))
                if not p.startswith("dvclive/")
            ),
        )
        for name, stage in rendered.items()
    ]


def command(step: Step, direct: bool = False) -> list[str]:
    """The process `step` runs: its command with this interpreter and the stage script of this checkout;
    `direct`: ``python stages/<stage>.py`` itself, without `posttrain.launch`.
    """
    python, *words = step.cmd
    if python != "python":
        raise ValueError(f"stage {step.name}: its command must start with python: {shlex.join(step.cmd)}")
    if direct:
        if words[:2] != ["-m", "posttrain.launch"]:
            raise ValueError(f"stage {step.name}: not run through posttrain.launch: {shlex.join(step.cmd)}")
        words = words[2:]
    return [sys.executable, *(str(ROOT / w) if w.startswith("stages/") else w for w in words)]


def run_steps(
    steps: Sequence[Step],
    work: Path,
    log: Path,
    seconds: dict[str, float] | None = None,
    direct: bool = False,
) -> dict[str, float]:
    """Run each step's command in `work` unless its outputs exist; stream and log its output; stop at a
    failure.

    Args:
        steps: the stages to run, in order (`plan`).
        work: the folder the commands run in (WORKDIR: its params.yaml, its data and models).
        log: the log file every stage's output is appended to.
        seconds: filled with each finished stage's wall time as it finishes (so an interrupted run keeps
            them); a new dict if None.
        direct: run ``python stages/<stage>.py`` itself instead of through `posttrain.launch` as dvc.yaml
            does (to check that the launcher changes nothing).

    Raises:
        RuntimeError: a stage exited non-zero; the message names it and the log.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    seconds = {} if seconds is None else seconds
    with log.open("a") as out:
        for step in steps:
            if all(p.exists() for p in step.outputs):
                print(f"[e2e] {step.name}: done before, skipped", flush=True)
                continue
            argv = command(step, direct)
            print(f"[e2e] {step.name}: {shlex.join(argv)}", flush=True)
            out.write(f"\n===== {step.name}\n")
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                out.write(line)
            if proc.wait():
                out.flush()
                raise RuntimeError(f"stage {step.name} failed (exit {proc.returncode}); see {log}")
            seconds[step.name] = round(time.perf_counter() - t0, 1)
            print(f"[e2e] {step.name}: {seconds[step.name]}s", flush=True)
    return seconds


def check_outputs(work: Path) -> dict:
    """What the stages wrote, checked: image tokens, adapters, pairs, the DPO step, metrics, critic.

    Raises:
        AssertionError: a check failed (the message says which).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    from posttrain.core.config import load_params
    from posttrain.data.examples import group_conversations, load_split
    from posttrain.models.loading import image_token_count, read_provenance
    from posttrain.models.template import encode_conversation

    data, models, metrics = work / "data" / "prepared", work / "models", work / "metrics"
    processor = AutoProcessor.from_pretrained(work / "hub" / "llava-1.5-7b")
    n_image = image_token_count(processor)
    assert n_image == 576, f"<image> expands to {n_image} tokens, not LLaVA-1.5's 576"
    train = load_split(data, "study_train")
    conversations = group_conversations(train)
    lengths = []
    for c in conversations:
        ids, labels = encode_conversation(
            processor.tokenizer, c.turns[:-1], *c.turns[-1], n_image, supervise_history=True
        )
        assert sum(int(i == processor.image_token_id) for i in ids) == n_image, f"{c.id}: image tokens cut"
        eos = sum(int(lab == processor.tokenizer.eos_token_id) for lab in labels)
        assert eos == len(c.turns), f"{c.id}: {eos} of {len(c.turns)} answers are trained"
        lengths.append(len(ids))

    adapters = {}
    for name in (*VARIANTS, "sfte", "sfte_dpo"):
        prov = read_provenance(model_dir(name, models), name)
        weights = load_file(str(model_dir(name, models) / "adapter_model.safetensors"))
        adapters[name] = weights
        assert prov["base_fingerprint"].startswith(str(work / "hub" / "llava-1.5-7b")), prov[
            "base_fingerprint"
        ]
    sft_prov = read_provenance(model_dir(VARIANTS[0], models), VARIANTS[0])
    held = {n: read_provenance(model_dir(n, models), n)["base_quantization"] for n in adapters}
    expected = sft_prov["params"]["common"]["quantization"]
    assert set(held.values()) == {expected}, f"adapters trained on differently held bases: {held}"
    changed = sum(not torch.equal(adapters["sfte"][k], adapters["sfte_dpo"][k]) for k in adapters["sfte"])
    assert changed > 0, "the DPO step left every SFTe weight unchanged"

    prefs = json.loads((metrics / "preferences.json").read_text())
    evaluated = pipeline_models(load_params(work / "params.yaml"))
    per_model = {m: json.loads((work / "data/eval/metrics" / f"{m}.json").read_text()) for m in evaluated}
    keys = {m: set(v) for m, v in per_model.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1, "metrics files have different keys"
    items = [json.loads(line) for line in (work / "data" / "eval" / "study_test" / "sfte_dpo.jsonl").open()]
    return {
        "image_tokens": n_image,
        "train_turns": len(train),
        "train_conversations": len(conversations),
        "train_sequence_tokens": {"min": min(lengths), "max": max(lengths)},
        "sft_quantization": sft_prov["params"]["common"]["quantization"],
        "sft_liger": sft_prov["params"]["common"]["liger"],
        "base_quantization_after_sft": held["sfte_dpo"],  # DPO trained, and every model evaluated, on it
        "sft_final_loss": sft_prov["training"].get("final_loss"),
        "sft_batch": sft_prov["training"].get("batch"),  # what batch_size auto picked
        "ensemble": read_provenance(models / "sfte", "ensemble")["ensemble"],
        "preferences": {
            k: prefs.get(k)
            for k in (
                "prompts",
                "identical_rate",
                "dropped_truncated",
                "judged_pairs",
                "tie_rate",
                "pairs_kept",
            )
        },
        "dpo_tensors_changed": f"{changed}/{len(adapters['sfte'])}",
        "dpo_training": read_provenance(models / "sfte_dpo", "dpo")["rounds"][-1]["training"],
        "test_items": len(items),
        "critic_parsed_items": sum(r["critic_score"] is not None for r in items),
        "metrics_keys": len(next(iter(keys.values()))),
        "metrics": {
            m: {k: v[k] for k in ("loss", "bleu", "rouge_l", "critic", "critic_unparsable")}
            for m, v in per_model.items()
        },
    }


def stage_rates(work: Path) -> dict:
    """The rates the stages logged in WORKDIR/logs: SFT rows/s, and tokens/s of the evaluation's generation
    (one answer per prompt), of preference sampling (two per prompt), of teacher-forced scoring, and the
    self-judge's pairwise prompts (one order each) per second.

    Generation rates count the tokens each row generated up to its EOS, prefill included in the time.
    """
    logs = work / "logs"

    def read(name: str) -> dict:
        path = logs / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def pooled(parts: list[dict], *counted: str) -> dict | None:
        parts = [p for p in parts if p]
        if not parts:
            return None
        total = {k: sum(p[k] for p in parts) for k in parts[0] if not k.endswith("_per_s")}
        for key in counted:
            if key in total:
                total[f"{key}_per_s"] = round(total[key] / total["seconds"], 1)
        return total

    sft = [read(v).get("samples_per_s") for v in VARIANTS]
    effective = {read(v).get("samples_per_step") for v in VARIANTS}
    evaluations = [read(p.stem) for p in sorted(logs.glob("evaluate_*.json"))]  # every model evaluated
    preferences = read("preferences")
    sampled = preferences.get("generate")
    judged = preferences.get("judge")  # the self-judge (`continuation_nll`); absent for other judges
    return {
        "sft_samples_per_s": round(sum(sft) / len(sft), 2) if all(sft) else None,
        "sft_samples_per_s_each": dict(zip(VARIANTS, sft)),
        "sft_effective_batch": effective.pop() if len(effective) == 1 else None,
        "evaluate_generate": pooled(
            [e.get("generate", {}) for e in evaluations], "new_tokens", "computed_tokens"
        ),
        "evaluate_score": pooled([e.get("score", {}) for e in evaluations], "tokens"),
        "preferences_generate": pooled([sampled or {}], "new_tokens", "computed_tokens"),
        "preferences_judge": pooled([judged or {}], "prompts", "tokens"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m posttrain e2e WORKDIR [--shrink]``; writes WORKDIR/summary.json and WORKDIR/e2e.log."""
    import torch

    ap = argparse.ArgumentParser(prog="python -m posttrain e2e", description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--shrink", action="store_true", help="2-layer towers of the same configs (CPU)")
    ap.add_argument("--until", help="stop after this stage (e.g. ensemble), to split the run")
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="launch.processes: SFT, evaluation and preference sampling in N processes (one per GPU)",
    )
    ap.add_argument(
        "--direct",
        action="store_true",
        help="run each stage as plain `python stages/<stage>.py`, not through the launcher (a check)",
    )
    ap.add_argument(
        "--measure",
        action="store_true",
        help=f"the stages' own rates at the preset's batches: {MEASURE_IMAGES} charts, {MEASURE_SFT_STEPS} "
        f"SFT steps, {MEASURE_PROMPTS} preference prompts, the preset's answer lengths (GPU)",
    )
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.shrink:
        print(
            "error: the 7B architectures need a CUDA GPU; add --shrink to run them shrunk on the CPU",
            file=sys.stderr,
        )
        return 2
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "shrunk": args.shrink}
    if args.measure:
        summary["measure"] = {
            "images": MEASURE_IMAGES,
            "test_images": MEASURE_TEST_IMAGES,
            "sft_steps": MEASURE_SFT_STEPS,
            "preference_prompts": MEASURE_PROMPTS,
        }
    images = MEASURE_IMAGES if args.measure else IMAGES
    # --measure scores with the reference judge: the critic's rate is bench/gpu.py's
    summary["standins"] = write_standins(
        work, args.shrink, "cuda" if cuda else "cpu", images, critic=not args.measure
    )
    write_params(work, cuda, measure=args.measure, processes=args.processes)
    steps = plan(work)
    if args.until:
        names = [s.name for s in steps]
        if args.until not in names:
            print(f"error: --until {args.until!r} is not one of {', '.join(names)}", file=sys.stderr)
            return 2
        steps = steps[: names.index(args.until) + 1]
    summary["stage_seconds"] = {}
    try:
        run_steps(steps, work, work / "e2e.log", summary["stage_seconds"], direct=args.direct)
        if not args.until:
            summary["checks"] = check_outputs(work)
    finally:  # also when interrupted (Ctrl-C, `timeout -s INT`): the stages that finished and their rates
        summary["stage_rates"] = stage_rates(work)
        summary["total_seconds"] = round(time.perf_counter() - t0, 1)
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
