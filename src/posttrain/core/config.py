"""params.yaml as typed, validated dataclasses.

Every section becomes a frozen dataclass (built from the YAML by `posttrain.core.convert`) that checks its own
values beside its fields, in its `problems` method. Unknown keys, wrong types, out-of-range values and
impossible combinations are collected over the whole file and raised once, as a `ParamsError` that names each
key, the value seen and the fix, before any data is read or any model is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from posttrain.core.convert import build, cut, shown
from posttrain.core.errors import InputError
from posttrain.core.layout import ROLES, pipeline_models

SEED_LIMIT = 2**32  # numpy's seeds (through transformers' set_seed) are below 2**32
MIN_VOCAB = 256 + 5  # the byte-level BPE's 256 byte symbols and posttrain.models.loading.SPECIAL_TOKENS
# Bounds on counts that no run here comes near (the study: 1,800 base steps, micro-batches of 32 and 128):
# a value beyond them is a typo (1e23 steps, a batch of 1e11 rows), refused before it starts a run
MAX_STEPS = 1_000_000  # every max_steps, warmup_steps and save_steps
MAX_BATCH = 65_536  # every batch_size, effective_batch and gradient_accumulation, in rows (or prompts)
MAX_YAML_VALUES = 10_000  # values of a params file with its aliases expanded (params.yaml has a few hundred)


class ParamsError(InputError, ValueError):
    """Every problem found in a params file, one per line."""

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


class _Problems(list[str]):
    """The problems a section's checks find, in the order they check; each method checks one kind of value.

    A value that did not convert is None here (its problem is already reported) and is skipped, so that a file
    with type and range problems reports all of them at once.
    """

    def positive(self, key: str, value: float | None, zero_ok: bool = False) -> None:
        if isinstance(value, BatchSize):  # auto: a batch_size that is not a number
            return
        if value is not None and (value < 0 or (value == 0 and not zero_ok)):
            self.append(f"{key}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")

    def within(self, key: str, value: float | None, low: float, high: float, closed: str = "[]") -> None:
        """`closed` gives the interval's brackets: "[]", "[)", "(]" or "()"."""
        if value is None:
            return
        above = value >= low if closed[0] == "[" else value > low
        below = value <= high if closed[1] == "]" else value < high
        if not (above and below):
            self.append(f"{key}: {value} is not in {closed[0]}{low}, {high}{closed[1]}")

    def seed(self, key: str, value: int | None) -> None:
        self.positive(key, value, zero_ok=True)
        if value is not None and value >= SEED_LIMIT:
            self.append(f"{key}: must be < {SEED_LIMIT} (numpy's seed range), got {value}")

    def steps(self, key: str, value: int | None) -> None:
        if isinstance(value, int) and value > MAX_STEPS:
            self.append(
                f"{key}: must be <= {MAX_STEPS} (MAX_STEPS of posttrain.core.config: far more steps than any "
                f"run of this pipeline takes), got {value}; give a step count up to {MAX_STEPS}"
            )

    def rows(
        self, key: str, value: int | BatchSize | None, what: str = "a batch size", auto: bool = False
    ) -> None:
        """A batch size (or a count of micro-batches) no larger than MAX_BATCH; `auto`: it may be auto."""
        if isinstance(value, int) and value > MAX_BATCH:
            self.append(
                f"{key}: must be <= {MAX_BATCH} (MAX_BATCH of posttrain.core.config: more rows than any "
                f"batch of this pipeline holds), got {value}; give {what} up to {MAX_BATCH}"
                + (" or auto" if auto else "")
            )

    def divides(self, key: str, value: int | None, divisor_key: str, divisor: int | None) -> None:
        if value is not None and divisor is not None and value > 0 and divisor > 0 and value % divisor:
            self.append(
                f"{key}: {value} is not a multiple of {divisor_key} {divisor}; pick sizes that divide"
            )

    def batch(self, section: str, s: SftCommon | DpoParams) -> None:
        """An integer batch_size with gradient_accumulation, or auto with effective_batch."""
        self.positive(f"{section}.gradient_accumulation", s.gradient_accumulation)
        self.positive(f"{section}.effective_batch", s.effective_batch)
        self.rows(f"{section}.batch_size", s.batch_size, auto=True)
        self.rows(f"{section}.gradient_accumulation", s.gradient_accumulation, "a gradient_accumulation")
        self.rows(f"{section}.effective_batch", s.effective_batch)
        if s.batch_size is BatchSize.AUTO:
            if s.effective_batch is None:
                self.append(
                    f"{section}.effective_batch: null, but {section}.batch_size: auto needs it; set it to "
                    f"the rows per optimizer step to keep (e.g. 16), or give {section}.batch_size an integer"
                )
            if s.gradient_accumulation is not None and s.gradient_accumulation != 1:
                self.append(
                    f"{section}.gradient_accumulation: {s.gradient_accumulation} with {section}.batch_size: "
                    f"auto, which derives it (effective_batch / the micro-batch that fits); set it to 1 and "
                    f"{section}.effective_batch to the rows per optimizer step"
                )
            return
        self.positive(f"{section}.batch_size", s.batch_size)
        if s.batch_size is not None and s.effective_batch is not None:
            accumulation = s.gradient_accumulation if s.gradient_accumulation is not None else "?"
            self.append(
                f"{section}.effective_batch: {s.effective_batch} is only read with batch_size: auto; set "
                f"{section}.batch_size: auto (and gradient_accumulation: 1), or remove effective_batch (with "
                f"an integer batch_size the effective batch is batch_size × gradient_accumulation = "
                f"{s.batch_size} × {accumulation})"
            )


class ModelKind(str, Enum):
    """Where the base model comes from."""

    TINY = "tiny"  # built and trained from scratch locally (the embedded default)
    HUB = "hub"  # a pinned Hugging Face checkpoint (the real study)

    @property
    def trains_from_scratch(self) -> bool:
        return self is ModelKind.TINY


class DataSource(str, Enum):
    """Where the examples come from."""

    SYNTHETIC = "synthetic"
    LRV_CHART = "lrv_chart"

    @property
    def has_pretrain_pool(self) -> bool:
        return self is DataSource.SYNTHETIC


class CriticKind(str, Enum):
    """Who scores responses 0–100."""

    REFERENCE = "reference"  # ground-truth rubric, no model
    LLAVA_CRITIC = "llava_critic"  # a transformers-format LLaVA-Critic checkpoint

    @property
    def needs_model(self) -> bool:
        return self is CriticKind.LLAVA_CRITIC


@dataclass(frozen=True)
class TinyParams:
    image_size: int = 84  # px; must equal prepare.synthetic.image_size
    patch_size: int = 12  # (image_size/patch_size)² image tokens per image
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 344
    vocab_size: int = 400  # byte-level BPE trained on the prepared text

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        for name in (
            "image_size",
            "patch_size",
            "vision_hidden",
            "vision_layers",
            "vision_heads",
            "text_hidden",
            "text_layers",
            "text_heads",
            "text_intermediate",
        ):
            found.positive(f"{key}.{name}", getattr(self, name))
        if self.vocab_size is not None and self.vocab_size < MIN_VOCAB:
            found.append(
                f"{key}.vocab_size: must be >= {MIN_VOCAB} (256 byte symbols and 5 special tokens), "
                f"got {self.vocab_size}"
            )
        found.divides(f"{key}.image_size", self.image_size, f"{key}.patch_size", self.patch_size)
        found.divides(f"{key}.vision_hidden", self.vision_hidden, f"{key}.vision_heads", self.vision_heads)
        found.divides(f"{key}.text_hidden", self.text_hidden, f"{key}.text_heads", self.text_heads)
        hidden, heads = self.text_hidden, self.text_heads
        if hidden and heads and hidden > 0 and heads > 0:
            head = hidden / heads
            if head.is_integer() and head % 2:
                found.append(
                    f"{key}.text_hidden: head size {hidden}/{heads} = {int(head)} is odd; rotary position "
                    "embeddings rotate pairs of dimensions, so pick an even head size"
                )
        return found


@dataclass(frozen=True)
class TrainParams:
    max_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    save_steps: int = 400  # checkpoint every N steps so a killed run resumes; 0 disables

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        for name in ("max_steps", "batch_size", "learning_rate"):
            found.positive(f"{key}.{name}", getattr(self, name))
        for name in ("warmup_steps", "weight_decay", "save_steps"):
            found.positive(f"{key}.{name}", getattr(self, name), zero_ok=True)
        for name in ("max_steps", "warmup_steps", "save_steps"):
            found.steps(f"{key}.{name}", getattr(self, name))
        found.rows(f"{key}.batch_size", self.batch_size)
        return found


@dataclass(frozen=True)
class BaseParams:
    seed: int = 0
    model: ModelKind = ModelKind.TINY
    hub_id: str = "llava-hf/llava-1.5-7b-hf"
    revision: str = ""
    threads: int = 2  # CPU threads for torch; 0 = torch's default
    tiny: TinyParams = field(default_factory=TinyParams)
    train: TrainParams = field(default_factory=TrainParams)

    def problems(self, key: str, source: DataSource | None) -> list[str]:
        """`source`: prepare.source, the data the base trains on (the tiny model needs the pretrain pool)."""
        found = _Problems()
        found.seed(f"{key}.seed", self.seed)
        found.positive(f"{key}.threads", self.threads, zero_ok=True)
        found += self.train.problems(f"{key}.train")
        found += self.tiny.problems(f"{key}.tiny")
        hub = self.model is ModelKind.HUB
        if hub and not self.hub_id:
            found.append(
                f"{key}.hub_id: empty; name the hub model (e.g. llava-hf/llava-1.5-7b-hf) or a folder"
            )
        if hub and self.hub_id and self.revision == "" and not Path(self.hub_id).is_dir():
            found.append(
                f"{key}.revision: empty; pin a commit of {self.hub_id} so the study is reproducible "
                "(`python -m posttrain pin` fills it in; a local folder needs none)"
            )
        if self.model is ModelKind.TINY and source is not None and not source.has_pretrain_pool:
            found.append(
                f"{key}.model: 'tiny' trains from scratch on the synthetic pretrain pool, but "
                f"prepare.source is {source.value!r}; use {key}.model: hub or prepare.source: synthetic"
            )
        return found


@dataclass(frozen=True)
class SyntheticParams:
    image_size: int = 84
    pretrain_images: int = 3000
    pretrain_test_images: int = 150
    study_images: int = 900
    study_test_images: int = 150
    questions_per_image: int = 3
    negative_fraction: float = 0.35
    followup_fraction: float = 0.5
    captions: bool = False  # the pretrain pool also asks "Describe the chart." (dense captions)
    presence: bool = False  # the pretrain pool also asks "Is there a <colour> bar in the chart?"

    def problems(self, key: str, tiny_image_size: int | None) -> list[str]:
        """`tiny_image_size`: base.tiny.image_size where the tiny base trains on these images, else None."""
        found = _Problems()
        for name in ("image_size", "pretrain_images", "study_images", "questions_per_image"):
            found.positive(f"{key}.{name}", getattr(self, name))
        if None not in (self.image_size, tiny_image_size) and self.image_size != tiny_image_size:
            found.append(
                f"{key}.image_size: {self.image_size} differs from base.tiny.image_size "
                f"{tiny_image_size}; make them equal"
            )
        for pool in ("pretrain", "study"):
            n, n_test = getattr(self, f"{pool}_images"), getattr(self, f"{pool}_test_images")
            if n_test is not None and not (0 < n_test and (n is None or n_test < n)):
                found.append(
                    f"{key}.{pool}_test_images: {n_test} must be > 0 and below {key}.{pool}_images ({n})"
                )
        for name in ("negative_fraction", "followup_fraction"):
            found.within(f"{key}.{name}", getattr(self, name), 0, 1)
        return found


@dataclass(frozen=True)
class LrvParams:
    hub_id: str = "lmms-lab/LLaVA-OneVision-Data"
    config: str = "lrv_chart"
    split: str = "train"
    revision: str = ""
    local_parquet: str | None = None  # a parquet file or folder in the same schema; skips the hub
    test_images: int = 200

    def problems(self, key: str, read: bool) -> list[str]:
        """`read`: prepare.source is lrv_chart, so the dataset is read (and must be pinned)."""
        found = _Problems()
        found.positive(f"{key}.test_images", self.test_images)
        if read and not self.local_parquet and self.revision == "":
            found.append(f"{key}.revision: empty; pin a dataset commit, or set {key}.local_parquet")
        return found


@dataclass(frozen=True)
class PrepareParams:
    source: DataSource = DataSource.SYNTHETIC
    seed: int = 0
    max_bad_fraction: float = 0.05
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    lrv: LrvParams = field(default_factory=LrvParams)

    def problems(self, key: str, tiny_image_size: int | None) -> list[str]:
        """`tiny_image_size`: base.tiny.image_size where the base is the tiny model, else None."""
        found = _Problems()
        found.seed(f"{key}.seed", self.seed)
        found.within(f"{key}.max_bad_fraction", self.max_bad_fraction, 0, 1)
        synthetic = self.source is DataSource.SYNTHETIC
        found += self.synthetic.problems(f"{key}.synthetic", tiny_image_size if synthetic else None)
        found += self.lrv.problems(f"{key}.lrv", read=self.source is DataSource.LRV_CHART)
        return found


class Quantization(str, Enum):
    """How the frozen base weights are held during LoRA training."""

    NONE = "none"  # full precision on CPU, bf16 on CUDA
    NF4 = "nf4"  # QLoRA: 4-bit NormalFloat through bitsandbytes (the study's setting)

    @property
    def needs_cuda(self) -> bool:
        return self is Quantization.NF4


class BaseWeights(str, Enum):
    """How the stages after SFT (preferences, DPO, evaluation) hold the base weights under the adapters."""

    AS_TRAINED = "as_trained"  # as SFT trained on it: nf4 when sft.common.quantization is nf4
    UNQUANTIZED = "unquantized"  # full precision on CPU, bf16 on CUDA, whatever SFT trained on


class BatchSize(str, Enum):
    """A batch_size that is not a number of rows."""

    # training: the largest divisor of effective_batch whose step fits the GPU; generation (preferences,
    # evaluate): the largest batch of prompts that fits (`posttrain.models.memory`)
    AUTO = "auto"


class EnsembleMethod(str, Enum):
    """How the SFT adapters are combined into one (PEFT `add_weighted_adapter`)."""

    CAT = "cat"  # concatenated ranks, weights 1/N: exactly the average of the merged models
    SVD = "svd"  # SVD of the averaged delta: exact when svd_rank >= the sum of ranks
    LINEAR = "linear"  # the study's naive average of A and B matrices: NOT the average model
    TIES = "ties"  # TIES merging (trim, elect sign, merge)

    @property
    def needs_equal_ranks(self) -> bool:
        return self is EnsembleMethod.LINEAR


@dataclass(frozen=True)
class SftCommon:
    rank: int = 16  # LoRA r, shared so the adapters have the same shapes
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    quantization: Quantization = Quantization.NONE
    max_steps: int = 200
    batch_size: int | BatchSize = 32  # rows per micro-batch, or auto: picked by the memory check
    learning_rate: float = 5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    save_steps: int = 100
    gradient_accumulation: int = 1  # micro-batches per optimizer step (effective batch = batch_size × this)
    effective_batch: int | None = None  # batch_size auto only: rows per optimizer step, kept exact
    gradient_checkpointing: bool = False  # recompute activations: far less memory, ~30% slower
    liger: bool = False  # Liger's fused RMSNorm/RoPE/SwiGLU kernels in the Llama language model (CUDA)
    replay_fraction: float = 0.0  # share of the SFT conversations drawn from the pretrain pool (forgetting)

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        for name in ("rank", "max_steps", "learning_rate"):
            found.positive(f"{key}.{name}", getattr(self, name))
        found.batch(key, self)
        for name in ("warmup_steps", "weight_decay", "save_steps"):
            found.positive(f"{key}.{name}", getattr(self, name), zero_ok=True)
        for name in ("max_steps", "warmup_steps", "save_steps"):
            found.steps(f"{key}.{name}", getattr(self, name))
        found.within(f"{key}.replay_fraction", self.replay_fraction, 0, 0.9)
        if self.target_modules is not None and not self.target_modules:
            found.append(f"{key}.target_modules: empty; name the language-model layers to adapt, e.g. q_proj")
        for i, module in enumerate(self.target_modules or ()):
            if module == "":
                found.append(f"{key}.target_modules[{i}]: empty; name a layer, e.g. q_proj")
        return found


@dataclass(frozen=True)
class SftVariant:
    alpha: float = 16.0
    dropout: float = 0.05

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        found.positive(f"{key}.alpha", self.alpha)
        found.within(f"{key}.dropout", self.dropout, 0, 1, "[)")
        return found


def _default_variants() -> dict[str, SftVariant]:
    return {
        "sft1": SftVariant(alpha=16.0, dropout=0.05),
        "sft2": SftVariant(alpha=8.0, dropout=0.05),
        "sft3": SftVariant(alpha=16.0, dropout=0.10),
        "sft4": SftVariant(alpha=8.0, dropout=0.10),
    }


@dataclass(frozen=True)
class SftParams:
    common: SftCommon = field(default_factory=SftCommon)
    variants: dict[str, SftVariant] = field(default_factory=_default_variants)

    def problems(self, key: str, base_model: ModelKind | None) -> list[str]:
        """`base_model`: base.model, the model the adapters train on (the tiny one: in full precision)."""
        found = _Problems(self.common.problems(f"{key}.common"))
        if self.variants is not None and not self.variants:
            found.append(
                f"{key}.variants: empty; define at least one variant "
                "(e.g. sft1: {alpha: 16, dropout: 0.05})"
            )
        for name, variant in (self.variants or {}).items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ROLES:
                found.append(
                    f"{key}.variants.{name}: variant names must match [a-z][a-z0-9_]* (no dots: PEFT adapter "
                    f"names) and not be one of {sorted(ROLES)}"
                )
            found += variant.problems(f"{key}.variants.{name}")
        quantization = self.common.quantization
        if quantization is not None and quantization.needs_cuda and base_model is ModelKind.TINY:
            found.append(
                f"{key}.common.quantization: nf4 quantizes a hub model on CUDA; the tiny model trains in "
                "full precision (use quantization: none)"
            )
        return found


@dataclass(frozen=True)
class AdaptersParams:
    base_weights: BaseWeights = BaseWeights.AS_TRAINED
    # decode with the adapter merged into the base weights (rounded to the base dtype once: bf16 on a GPU)
    # instead of as a separate layer, as DPO trained it; false keeps the trained change (docs/real-study.md)
    merge: bool = False


@dataclass(frozen=True)
class EnsembleParams:
    method: EnsembleMethod = EnsembleMethod.CAT
    svd_rank: int = 0  # svd only; 0 = the sum of the members' ranks (exact)
    density: float = 0.5  # ties only: share of each delta kept

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        found.positive(f"{key}.svd_rank", self.svd_rank, zero_ok=True)
        found.within(f"{key}.density", self.density, 0, 1, "(]")
        return found


class Judge(str, Enum):
    """Who picks the better of two sampled answers."""

    SELF = "self"  # the policy itself (the study's self-critique)
    CRITIC = "critic"  # LLaVA-Critic (evaluate.critic.model)
    REFERENCE = "reference"  # ground truth: rejection sampling with a known answer

    @property
    def needs_critic_model(self) -> bool:
        return self is Judge.CRITIC


class PairKeep(str, Enum):
    """Which judged pairs DPO trains on."""

    DECISIVE = "decisive"  # every pair both orders agree on (the seed study's)
    CORRECTNESS = "correctness"  # only a correct answer over a wrong one: a margin the ground truth vouches

    @property
    def needs_reference_judge(self) -> bool:
        return self is PairKeep.CORRECTNESS


class DpoLoss(str, Enum):
    """TRL DPO loss types offered here."""

    SIGMOID = "sigmoid"  # the DPO paper's loss
    IPO = "ipo"
    HINGE = "hinge"
    ROBUST = "robust"  # cDPO/robust DPO: assumes a share `label_smoothing` of the verdicts are flipped

    @property
    def needs_label_smoothing(self) -> bool:
        """Robust DPO (Chowdhury et al. 2024) with label_smoothing 0 is plain DPO."""
        return self is DpoLoss.ROBUST


@dataclass(frozen=True)
class PreferencesParams:
    judge: Judge = Judge.REFERENCE
    max_prompts: int = 0  # 0 = every study-train prompt
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 24
    batch_size: int | BatchSize = 64  # prompts a batch, or auto: the most that fit the GPU
    seed: int = 0
    min_pairs: int = 8  # fewer surviving pairs is an error
    keep: PairKeep = (
        PairKeep.CORRECTNESS
    )  # decisive: every pair both orders agree on (needed by other judges)

    def problems(self, key: str, critic_model: str | None) -> list[str]:
        """`critic_model`: evaluate.critic.model, the critic that ``judge: critic`` asks."""
        found = _Problems()
        for name in ("temperature", "max_new_tokens", "batch_size", "min_pairs"):
            found.positive(f"{key}.{name}", getattr(self, name))
        found.positive(f"{key}.max_prompts", self.max_prompts, zero_ok=True)
        found.rows(f"{key}.batch_size", self.batch_size, auto=True)
        found.within(f"{key}.top_p", self.top_p, 0, 1, "(]")
        found.seed(f"{key}.seed", self.seed)
        if self.judge is not None and self.judge.needs_critic_model and critic_model == "":
            found.append(
                f"{key}.judge: 'critic' needs evaluate.critic.model (a transformers-format "
                "LLaVA-Critic); set it or use judge: self / reference"
            )
        if self.keep is not None and self.keep.needs_reference_judge and self.judge is not Judge.REFERENCE:
            found.append(
                f"{key}.keep: 'correctness' keeps the pairs the ground truth orders by correctness, "
                f"which is the reference judge's verdict; with {key}.judge: "
                f"{self.judge.value if self.judge else None} use keep: decisive, or judge: reference"
            )
        return found


@dataclass(frozen=True)
class DpoParams:
    beta: float = 0.1
    loss_type: DpoLoss = DpoLoss.SIGMOID
    learning_rate: float = 2e-4
    epochs: float = 1.0
    batch_size: int | BatchSize = 16  # pairs per micro-batch, or auto: picked by the memory check
    gradient_accumulation: int = 1  # micro-batches per optimizer step (effective pairs = batch_size × this)
    effective_batch: int | None = None  # batch_size auto only: pairs per optimizer step, kept exact
    gradient_checkpointing: bool = False
    warmup_steps: int = 5
    rounds: int = 1  # each extra round samples from the last round's model, judges and trains again
    label_smoothing: float = 0.0  # assumed share of wrong verdicts (robust); must be in (0, 0.5) for robust
    save_steps: int = 20  # checkpoint interval for resuming a killed run; 0 disables
    heldout_fraction: float = 0.2  # share of the pairs (by image) kept out of training to measure the rewards
    sft_weight: float = 0.0  # weight of the chosen answers' NLL added to the DPO loss (RPO); 0 is plain DPO

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        for name in ("beta", "learning_rate", "epochs", "rounds"):
            found.positive(f"{key}.{name}", getattr(self, name))
        found.batch(key, self)
        for name in ("warmup_steps", "save_steps"):
            found.positive(f"{key}.{name}", getattr(self, name), zero_ok=True)
        for name in ("warmup_steps", "save_steps"):
            found.steps(f"{key}.{name}", getattr(self, name))
        found.within(f"{key}.heldout_fraction", self.heldout_fraction, 0, 0.5, "[)")
        found.positive(f"{key}.sft_weight", self.sft_weight, zero_ok=True)
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 0.5:
            found.append(f"{key}.label_smoothing: {self.label_smoothing} is not in [0, 0.5)")
        elif (
            self.loss_type is not None and self.loss_type.needs_label_smoothing and self.label_smoothing == 0
        ):
            found.append(
                f"{key}.loss_type: 'robust' with {key}.label_smoothing 0 is plain DPO; set "
                f"{key}.label_smoothing to the share of verdicts you expect to be wrong (e.g. 0.1), or use "
                "loss_type: sigmoid"
            )
        return found


@dataclass(frozen=True)
class CriticParams:
    kind: CriticKind = CriticKind.REFERENCE
    model: str = ""  # local folder or hub id of a transformers-format LLaVA-Critic
    revision: str = ""
    batch_size: int = 8
    max_new_tokens: int = 256

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        for name in ("batch_size", "max_new_tokens"):
            found.positive(f"{key}.{name}", getattr(self, name))
        found.rows(f"{key}.batch_size", self.batch_size)
        if self.kind is not None and self.kind.needs_model and self.model == "":
            found.append(
                f"{key}.model: empty; give a transformers-format LLaVA-Critic folder or hub id "
                f"(or use {key}.kind: reference)"
            )
        return found


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int | BatchSize = 64  # prompts (and scored sequences) a batch, or auto: the most that fit
    max_new_tokens: int = 24
    resamples: int = 1000  # bootstrap resamples for the 95% CIs
    seed: int = 0
    critic: CriticParams = field(default_factory=CriticParams)

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        for name in ("batch_size", "max_new_tokens", "resamples"):
            found.positive(f"{key}.{name}", getattr(self, name))
        found.seed(f"{key}.seed", self.seed)
        found.rows(f"{key}.batch_size", self.batch_size, auto=True)
        found += self.critic.problems(f"{key}.critic")
        return found


@dataclass(frozen=True)
class ReportParams:
    baseline: str = "base"
    examples: int = 24  # side-by-side examples in the HTML page
    resamples: int = 1000
    seed: int = 0

    def problems(self, key: str, evaluated: list[str] | None) -> list[str]:
        """`evaluated`: the models the pipeline evaluates (dvc.yaml's evaluate stages), None if unknown."""
        found = _Problems()
        if evaluated and self.baseline is not None and self.baseline not in evaluated:
            found.append(
                f"{key}.baseline: {shown(self.baseline)} is not a model the pipeline evaluates "
                f"({', '.join(evaluated)}); pick one of them"
            )
        found.positive(f"{key}.examples", self.examples, zero_ok=True)
        found.positive(f"{key}.resamples", self.resamples)
        found.seed(f"{key}.seed", self.seed)
        return found


@dataclass(frozen=True)
class LaunchParams:
    processes: int = 1  # processes per stage (one per GPU); read by `posttrain.launch` when a stage runs

    def problems(self, key: str) -> list[str]:
        found = _Problems()
        found.positive(f"{key}.processes", self.processes)
        return found


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    sft: SftParams = field(default_factory=SftParams)
    adapters: AdaptersParams = field(default_factory=AdaptersParams)
    ensemble: EnsembleParams = field(default_factory=EnsembleParams)
    preferences: PreferencesParams = field(default_factory=PreferencesParams)
    dpo: DpoParams = field(default_factory=DpoParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)
    launch: LaunchParams = field(default_factory=LaunchParams)

    def problems(self) -> list[str]:
        """Every section's range checks and impossible combinations, section by section (adapters has none).

        Five checks hold one section's value against another's: base.model against prepare.source,
        prepare.synthetic.image_size against base.tiny.image_size, sft.common.quantization against base.model,
        preferences.judge against evaluate.critic.model, report.baseline against the models of sft.variants.
        Each is reported in the section it names, at its place among that section's checks (two sit between
        others), so that section takes the other's value as an argument, from here: the one place where the
        sections meet.
        """
        base = self.base
        tiny_image_size = base.tiny.image_size if base.model is ModelKind.TINY else None
        evaluated = pipeline_models(self) if self.sft.variants is not None else None
        return [
            *base.problems("base", source=self.prepare.source),
            *self.prepare.problems("prepare", tiny_image_size=tiny_image_size),
            *self.sft.problems("sft", base_model=base.model),
            *self.ensemble.problems("ensemble"),
            *self.preferences.problems("preferences", critic_model=self.evaluate.critic.model),
            *self.dpo.problems("dpo"),
            *self.evaluate.problems("evaluate"),
            *self.launch.problems("launch"),
            *self.report.problems("report", evaluated=evaluated),
        ]


def parse_params(data: dict, source: str = "params") -> Params:
    """Build and validate `Params` from a mapping; raise one `ParamsError` listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ParamsError([f"top level: expected a mapping of sections, got {type(data).__name__}"], source)
    params = build(Params, data, "params", problems)
    problems = [p.removeprefix("params.") for p in problems] + params.problems()
    if problems:
        raise ParamsError(problems, source)
    return params


def _alias_problems(text: str) -> list[str]:
    """An alias that holds itself, or aliases that expand the file past MAX_YAML_VALUES values.

    YAML shares an anchored value between its aliases, so nine aliases of nine aliases ... (billion laughs)
    stay small as parsed, but every walk over the values (validation, a message quoting one) expands them:
    minutes and gigabytes. Counted on the parser's events, before any tree is walked.
    """
    sizes: dict[str, int] = {}  # anchor: its values, expanded
    open_anchors: list[tuple[str | None, int]] = []  # (anchor, total at its start) of each open collection
    total = 0
    aliased = False
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_anchors):
                return [
                    f"line {event.start_mark.line + 1}: the alias *{cut(event.anchor)} refers to the "
                    "collection that holds it (an endless value); write the values out"
                ]
            total += sizes.get(event.anchor, 0)  # an undefined alias is the composer's error
            aliased = True
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            open_anchors.append((event.anchor, total - 1))
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, start = open_anchors.pop()
            if anchor is not None:
                sizes[anchor] = total - start
        if aliased and total > MAX_YAML_VALUES:
            return [
                f"aliases (*name) expand the file to more than {MAX_YAML_VALUES} values (MAX_YAML_VALUES of "
                "posttrain.core.config; params.yaml has a few hundred); write the values out instead of "
                "repeating aliases"
            ]
    return []


def _duplicate_keys(node: yaml.Node, path: str = "") -> list[str]:
    """Every key given twice in one mapping of the YAML tree `node` (YAML itself keeps the last silently)."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":  # merge keys may override
                continue
            key = f"{path}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key_node.value in first_line:
                problems.append(
                    f"{key}: given twice (lines {first_line[key_node.value]} and {line}); YAML would "
                    "silently keep the last, delete one"
                )
            else:
                first_line[key_node.value] = line
            problems += _duplicate_keys(value_node, f"{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{path.removesuffix('.')}[{i}].")
    return problems


def read_params_text(text: str, source: str) -> Params:
    """Validate a params file's text: YAML syntax, aliases, duplicate keys, emptiness, then `parse_params`.

    YAML is parsed as data (safe loader), never evaluated. Every problem is raised at once as a `ParamsError`;
    aliases that expand past MAX_YAML_VALUES values are refused alone, before anything walks the values.
    """
    loader = yaml.SafeLoader(text)
    try:
        aliases = _alias_problems(text)
        if aliases:
            raise ParamsError(aliases, source)
        node = loader.get_single_node()
        # on the tree as written: building the data merges `<<: *alias` keys into their mapping
        duplicates = _duplicate_keys(node) if node is not None else []
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        raise ParamsError([f"{where}not valid YAML ({what or e}); fix the syntax there"], source) from None
    finally:
        loader.dispose()
    if data is None:
        raise ParamsError(
            ["the file is empty; write the sections to change (params.yaml lists every key)"], source
        )
    try:
        params = parse_params(data, source)
    except ParamsError as e:
        raise ParamsError(duplicates + e.problems, source) from None
    if duplicates:
        raise ParamsError(duplicates, source)
    return params


def read_params_file(path: str | Path) -> str:
    """The text of a params file; a missing one is a `ParamsError`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(["the file does not exist; pass an existing params file"], str(path)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file (see `read_params_text`)."""
    return read_params_text(read_params_file(path), str(path))


def downstream_quantization(params: Params) -> Quantization:
    """How the stages after SFT hold the base weights: as SFT trained on them, unless told otherwise.

    Every model in the comparison (the base row too) is loaded this way, so a delta against the base measures
    the adapters, not a change of precision.
    """
    if params.adapters.base_weights is BaseWeights.AS_TRAINED:
        return params.sft.common.quantization
    return Quantization.NONE


def to_dict(obj: Any) -> Any:
    """Plain-data view of a params dataclass (enums as their values), for provenance files."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
