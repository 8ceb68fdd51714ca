"""Resuming a killed training run, and only the same run: checkpoints, their fingerprint, curves, timings.

Every training stage (base, SFT, DPO) goes through `fit`:

- `checkpoint_dir/fingerprint.json` holds what the run depends on (its params, a hash of its data, the base
  and start adapter). A folder left by a killed run is resumed only when the fingerprint matches; otherwise
  it is deleted and the run starts over, saying which input changed (`claim_checkpoints`).
- The Trainer's own resume loads a LLaVA checkpoint under the key names it was saved with
  (``language_model.model.layers.0…``) into a model that names them ``model.language_model.layers.0…``:
  nothing matches, a hidden warning says so, and training goes on from the fresh initialisation.
  `ResumeWeights` loads full models through ``from_pretrained`` (which maps the names) and checks that every
  trainable tensor equals the checkpoint's, or fails.
- Curves go to DVCLive at the Trainer's global step, without the timing entries (runtime, samples per
  second), so a rerun writes the same files; after a resume the curves keep the steps before the kill.
- A loss that becomes NaN or infinite stops the run with an error instead of saving NaN weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from posttrain.core.runtime import hide_bitsandbytes_without_cuda

hide_bitsandbytes_without_cuda()  # before transformers' Trainer callbacks import it (see there)

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

FINGERPRINT = "fingerprint.json"
# kept out of the curves: timings differ from run to run; the end-of-training `train_*` summary (e.g.
# train_loss) and TRL's `num_tokens` count only what the last process ran, which a resume changes
SKIPPED_KEYS = ("runtime", "per_second", "total_flos", "train_", "num_tokens")


def file_digest(*paths: str | Path) -> str:
    """SHA-256 over the bytes of `paths` (files, or every file under a folder, in sorted order)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def claim_checkpoints(checkpoint_dir: Path, fingerprint: dict) -> None:
    """Keep `checkpoint_dir` for resuming only if it was left by a run with this `fingerprint`.

    Otherwise the folder is deleted (the run starts over, and says why) and the new fingerprint written, so a
    run killed later resumes only into the same inputs.
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / FINGERPRINT
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # as it reads back
    if checkpoint_dir.exists():
        old = json.loads(path.read_text()) if path.exists() else None
        if old != fingerprint:
            changed = sorted(k for k in fingerprint if old.get(k) != fingerprint[k]) if old else []
            why = f"its {', '.join(changed)} changed" if changed else "it has no fingerprint"
            print(f"{checkpoint_dir}: left by a run with other inputs ({why}); starting over", flush=True)
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder (the Trainer writes trainer_state.json last), or None."""
    done = [p.parent for p in Path(checkpoint_dir).glob("checkpoint-*/trainer_state.json")]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


class ResumeWeights(TrainerCallback):
    """Make the weights a resumed run starts from equal the checkpoint's, or fail.

    Runs at ``on_train_begin``, after the Trainer's own (possibly silently partial) load and before the
    first step. A full model is reloaded through ``from_pretrained``; a PEFT adapter is loaded by the
    Trainer through PEFT, and checked here.
    """

    def __init__(self, checkpoint: Path):
        self.checkpoint = Path(checkpoint)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft import PeftModel, get_peft_model_state_dict
        from safetensors.torch import load_file

        if isinstance(model, PeftModel):
            saved = load_file(str(self.checkpoint / "adapter_model.safetensors"))
            live = get_peft_model_state_dict(model, adapter_name="default")
        else:
            reloaded = type(model).from_pretrained(self.checkpoint, dtype=model.dtype)
            saved = reloaded.state_dict()
            model.load_state_dict(saved, strict=True)  # raises on any missing or unexpected name
            live = dict(model.named_parameters())
        wrong = [k for k, v in live.items() if k not in saved or not torch.equal(v.cpu(), saved[k].cpu())]
        if wrong or not live:
            raise RuntimeError(
                f"resuming from {self.checkpoint}: {len(wrong)} of {len(live)} weight tensors do not match "
                f"the checkpoint (e.g. {wrong[:3]}); delete {self.checkpoint.parent} to start over"
            )
        print(f"resumed {len(live)} weight tensors from {self.checkpoint}", flush=True)


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop with an error when the logged loss or gradient norm is NaN or infinite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise FloatingPointError(
                    f"the training {key} became {value} at step {state.global_step}: the run diverged and "
                    f"nothing was saved; lower the learning rate (now {args.learning_rate}) or raise warmup"
                )


def log_row(live, step: int, logs: dict) -> None:
    """One Trainer log entry as DVCLive rows at `step`, timings left out (same run, same files)."""
    from dvclive.utils import standardize_metric_name

    live.step = step
    for key, value in logs.items():
        if isinstance(value, (int, float)) and key != "step" and not any(t in key for t in SKIPPED_KEYS):
            live.log_metric(standardize_metric_name(key, "dvclive.huggingface"), value)


class LiveCallback(TrainerCallback):
    """The Trainer's logs as DVCLive curves at its global step (`log_row`)."""

    def __init__(self, live):
        self.live = live

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        log_row(self.live, state.global_step, logs)


class StepTimes(TrainerCallback):
    """Wall clock at the end of every optimizer step: the steady rate leaves out the first steps' warm-up."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())  # no device sync: the host runs ahead as in any step

    def on_train_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and self.times:
            torch.cuda.synchronize()  # the last step's kernels done: the total is the device's time
            self.times[-1] = time.perf_counter()

    def samples_per_s(self, samples_per_step: int, skip: int = 2) -> float | None:
        """Rows per second over the steps after the first `skip` (None if too few steps ran)."""
        if len(self.times) < skip + 2:
            return None
        steps = len(self.times) - 1 - skip
        return round(steps * samples_per_step / (self.times[-1] - self.times[skip]), 3)


def open_live(live_dir: Path | None, resume_from: Path | None):
    """A DVCLive logger that writes only the curves, ``live_dir/plots`` (None: no curves).

    No summary, params or dvc.yaml beside them: the curves are the stage's declared output, restorable from
    DVC's cache. The folder starts empty. A run resumed from a checkpoint first writes the rows of the steps
    before it from the checkpoint's own log history (``trainer_state.json``), not from the folder: `dvc repro`
    deletes a stage's outputs before running it, so the killed run's rows are gone by then, and rows it logged
    after its last checkpoint must not stay either.
    """
    if live_dir is None:
        return None
    from dvclive import Live

    shutil.rmtree(Path(live_dir) / "plots", ignore_errors=True)
    live = Live(dir=str(live_dir), resume=False, dvcyaml=False, save_dvc_exp=False, report=None)
    if resume_from is not None:
        history = json.loads((Path(resume_from) / "trainer_state.json").read_text())["log_history"]
        for entry in history:
            log_row(live, entry["step"], entry)
    return live


def fit(trainer, live_dir: Path | None) -> dict:
    """Run `trainer`, resuming from the newest complete checkpoint in its output folder if there is one.

    Call `claim_checkpoints` on that folder first: what is left there is then from a run with the same inputs.

    Returns:
        The training summary for provenance (steps, losses; nothing that differs between identical runs) and,
        under ``timing``, the wall time and the checkpoint resumed from (for logs, never for outputs).
    """
    resume_from = newest_checkpoint(Path(trainer.args.output_dir))
    step0 = int(resume_from.name.split("-")[1]) if resume_from else None
    if resume_from:
        print(f"resuming from {resume_from} (step {step0})", flush=True)
        trainer.add_callback(ResumeWeights(resume_from))
    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints a shorter line
    trainer.add_callback(StopOnNonFiniteLoss())
    live = open_live(live_dir, resume_from) if trainer.args.process_index == 0 else None  # one writes them
    if live is not None:
        trainer.add_callback(LiveCallback(live))
    step_times = StepTimes()
    trainer.add_callback(step_times)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - t0  # the curves are written row by row: no Live.end() and its summary
    args = trainer.args
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    history = [h for h in trainer.state.log_history if "loss" in h]  # restored from a checkpoint too
    # not `result.training_loss`: the mean over the steps this process ran, which a resume changes
    return {
        "steps": trainer.state.global_step,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "timing": {
            "train_seconds": round(seconds, 2),
            "resumed_from": str(resume_from) if resume_from else None,
            "samples_per_step": samples_per_step,
            "samples_per_s": step_times.samples_per_s(samples_per_step),
        },
    }
