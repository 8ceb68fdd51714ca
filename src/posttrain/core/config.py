"""params.yaml as typed, validated dataclasses.

Every section becomes a frozen dataclass. Unknown keys, wrong types, out-of-range values and impossible
combinations are collected over the whole file and raised once, as a `ParamsError` that names each key, the
value seen and the fix, before any data is read or any model is loaded.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import math
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from posttrain.core.errors import InputError
from posttrain.core.layout import ROLES, pipeline_models


class ParamsError(InputError, ValueError):
    """Every problem found in a params file, one per line."""

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


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


@dataclass(frozen=True)
class TrainParams:
    max_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    save_steps: int = 400  # checkpoint every N steps so a killed run resumes; 0 disables


@dataclass(frozen=True)
class BaseParams:
    seed: int = 0
    model: ModelKind = ModelKind.TINY
    hub_id: str = "llava-hf/llava-1.5-7b-hf"
    revision: str = ""
    threads: int = 2  # CPU threads for torch; 0 = torch's default
    tiny: TinyParams = field(default_factory=TinyParams)
    train: TrainParams = field(default_factory=TrainParams)


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


@dataclass(frozen=True)
class LrvParams:
    hub_id: str = "lmms-lab/LLaVA-OneVision-Data"
    config: str = "lrv_chart"
    split: str = "train"
    revision: str = ""
    local_parquet: str | None = None  # a parquet file or folder in the same schema; skips the hub
    test_images: int = 200


@dataclass(frozen=True)
class PrepareParams:
    source: DataSource = DataSource.SYNTHETIC
    seed: int = 0
    max_bad_fraction: float = 0.05
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    lrv: LrvParams = field(default_factory=LrvParams)


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


@dataclass(frozen=True)
class SftVariant:
    alpha: float = 16.0
    dropout: float = 0.05


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


@dataclass(frozen=True)
class CriticParams:
    kind: CriticKind = CriticKind.REFERENCE
    model: str = ""  # local folder or hub id of a transformers-format LLaVA-Critic
    revision: str = ""
    batch_size: int = 8
    max_new_tokens: int = 256


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int | BatchSize = 64  # prompts (and scored sequences) a batch, or auto: the most that fit
    max_new_tokens: int = 24
    resamples: int = 1000  # bootstrap resamples for the 95% CIs
    seed: int = 0
    critic: CriticParams = field(default_factory=CriticParams)


@dataclass(frozen=True)
class ReportParams:
    baseline: str = "base"
    examples: int = 24  # side-by-side examples in the HTML page
    resamples: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class LaunchParams:
    processes: int = 1  # processes per stage (one per GPU); read by `posttrain.launch` when a stage runs


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


_BAD = object()  # _convert's result for a value that does not fit its type (the problem is already recorded)
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
SEED_LIMIT = 2**32  # numpy's seeds (through transformers' set_seed) are below 2**32
MIN_VOCAB = 256 + 5  # the byte-level BPE's 256 byte symbols and posttrain.models.loading.SPECIAL_TOKENS
# Bounds on counts that no run here comes near (the study: 1,800 base steps, micro-batches of 32 and 128):
# a value beyond them is a typo (1e23 steps, a batch of 1e11 rows), refused before it starts a run
MAX_STEPS = 1_000_000  # every max_steps, warmup_steps and save_steps
MAX_BATCH = 65_536  # every batch_size, effective_batch and gradient_accumulation, in rows (or prompts)
MAX_YAML_VALUES = 10_000  # values of a params file with its aliases expanded (params.yaml has a few hundred)
MAX_SHOWN = 80  # characters of a value quoted in a problem


def _cut(text: str) -> str:
    """`text` cut to MAX_SHOWN characters, for a problem that quotes it (a pasted text, a long list)."""
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}… ({len(text)} characters)"


def _shown(value: Any) -> str:
    """`value`'s repr as a problem quotes it (`_cut`)."""
    return _cut(repr(value))


def _number_hint(value: Any, integer: bool) -> str:
    """How to write `value` (what YAML read for a number key) so that YAML reads a number."""
    if isinstance(value, float) and integer and math.isfinite(value) and value.is_integer():
        return f" (write {int(value)})"
    if not isinstance(value, str):
        return ""
    text = value.strip()
    if _SCIENTIFIC.fullmatch(text):  # YAML 1.1 reads 2e-3 (no dot) as a string, 2.0e-3 as a number
        number = decimal.Decimal(text)
        plain = format(number, "f")
        if integer:
            whole = number == number.to_integral_value()
            return f" (write {plain})" if whole and len(plain) <= MAX_SHOWN else ""
        mantissa, exponent = re.split("[eE]", text)
        dotted = mantissa if "." in mantissa else f"{mantissa}.0"
        plain = f"{plain} or " if len(plain) <= MAX_SHOWN else ""
        return f" (YAML 1.1 reads {_cut(text)} as a string: write {plain}{dotted}e{exponent})"
    try:
        float(text)
    except ValueError:
        return ""
    return " (remove the quotes)"


def _convert(value: Any, tp: Any, key: str, problems: list[str], words: tuple[str, ...] = ()) -> Any:
    """Convert a YAML value to `tp`; when it does not fit, append a problem and return `_BAD`.

    A container's own problems make it `_BAD`; a problem inside it leaves it whole, with the bad item `_BAD`
    (a list item) or unknown (a dataclass field, see `_build`). A union is its first type, None where it
    allows None, and the values of the enums after the first type (``int | BatchSize``: an integer or
    ``auto``); `words` are those values, named in the problem when the first type does not fit either.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        enums = [a for a in args[1:] if isinstance(a, type) and issubclass(a, Enum)]
        for enum in enums:
            if value in [m.value for m in enum]:
                return enum(value)
        return _convert(value, args[0], key, problems, tuple(m.value for e in enums for m in e))
    if origin is dict:
        value_type = typing.get_args(tp)[1]
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_shown(value)}")
            return _BAD
        out = {str(k): _convert(v, value_type, f"{key}.{_cut(str(k))}", problems) for k, v in value.items()}
        return {k: _unknown(value_type) if v is _BAD else v for k, v in out.items()}
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, list):
            hint = f" (write [{_cut(value)}])" if isinstance(value, str) else ""
            problems.append(f"{key}: expected a list, got {_shown(value)}{hint}")
            return _BAD
        items = (_convert(v, item_type, f"{key}[{i}]", problems) for i, v in enumerate(value))
        return tuple(None if v is _BAD else v for v in items)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_shown(value)}")
            return _BAD
        return _build(tp, value, key, problems)
    if isinstance(tp, type) and issubclass(tp, Enum):
        choices = [m.value for m in tp]
        if value not in choices:
            problems.append(f"{key}: {_shown(value)} is not one of {choices}")
            return _BAD
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            hint = " (remove the quotes)" if str(value).lower() in ("true", "false") else ""
            problems.append(f"{key}: expected true/false, got {_shown(value)}{hint}")
            return _BAD
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            what = "".join(f" or {w!r}" for w in words)
            problems.append(
                f"{key}: expected an integer{what}, got {_shown(value)}{_number_hint(value, integer=True)}"
            )
            return _BAD
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(
                f"{key}: expected a number, got {_shown(value)}{_number_hint(value, integer=False)}"
            )
            return _BAD
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats; they train into NaN weights
            problems.append(f"{key}: must be a finite number, got {value!r}; write a finite value")
            return _BAD
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if value is None:
                hint = " (write '' for none)"
            elif isinstance(value, (int, float, bool, datetime.date)):
                hint = " (quote it)"
            else:
                hint = ""
            problems.append(f"{key}: expected a string, got {_shown(value)}{hint}")
            return _BAD
        return value
    raise TypeError(f"unsupported params type {tp} at {key}")


def _unknown(tp: Any) -> Any:
    """The stand-in for a value that did not convert: None, or a dataclass of unknowns (so checks skip it)."""
    if not dataclasses.is_dataclass(tp):
        return None
    hints = typing.get_type_hints(tp)
    return tp(**{f.name: _unknown(hints[f.name]) for f in dataclasses.fields(tp)})


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    """`cls` from `data`: missing keys take their defaults, values that do not convert are unknown (None)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for unknown in sorted(set(data) - set(names)):
        problems.append(
            f"{prefix}.{_cut(str(unknown))}: unknown key (known: {', '.join(names)}); remove or rename it"
        )
    kwargs = {}
    for name in names:
        if name in data:
            value = _convert(data[name], hints[name], f"{prefix}.{name}", problems)
            kwargs[name] = _unknown(hints[name]) if value is _BAD else value
    return cls(**kwargs)


def _check(p: Params, problems: list[str]) -> None:
    """Range checks of every number, and impossible combinations across sections.

    A value that did not convert is None here (its problem is already reported) and is skipped, so that a file
    with type and range problems reports all of them at once.
    """

    def positive(key: str, value: float | None, zero_ok: bool = False) -> None:
        if isinstance(value, BatchSize):  # auto: a batch_size that is not a number
            return
        if value is not None and (value < 0 or (value == 0 and not zero_ok)):
            problems.append(f"{key}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")

    def within(key: str, value: float | None, low: float, high: float, closed: str = "[]") -> None:
        """`closed` gives the interval's brackets: "[]", "[)", "(]" or "()"."""
        if value is None:
            return
        above = value >= low if closed[0] == "[" else value > low
        below = value <= high if closed[1] == "]" else value < high
        if not (above and below):
            problems.append(f"{key}: {value} is not in {closed[0]}{low}, {high}{closed[1]}")

    def seed(key: str, value: int | None) -> None:
        positive(key, value, zero_ok=True)
        if value is not None and value >= SEED_LIMIT:
            problems.append(f"{key}: must be < {SEED_LIMIT} (numpy's seed range), got {value}")

    def steps(key: str, value: int | None) -> None:
        if isinstance(value, int) and value > MAX_STEPS:
            problems.append(
                f"{key}: must be <= {MAX_STEPS} (MAX_STEPS of posttrain.core.config: far more steps than any "
                f"run of this pipeline takes), got {value}; give a step count up to {MAX_STEPS}"
            )

    def rows(key: str, value: int | BatchSize | None, what: str = "a batch size", auto: bool = False) -> None:
        """A batch size (or a count of micro-batches) no larger than MAX_BATCH; `auto`: it may be auto."""
        if isinstance(value, int) and value > MAX_BATCH:
            problems.append(
                f"{key}: must be <= {MAX_BATCH} (MAX_BATCH of posttrain.core.config: more rows than any "
                f"batch of this pipeline holds), got {value}; give {what} up to {MAX_BATCH}"
                + (" or auto" if auto else "")
            )

    def divides(key: str, value: int | None, divisor_key: str, divisor: int | None) -> None:
        if value is not None and divisor is not None and value > 0 and divisor > 0 and value % divisor:
            problems.append(
                f"{key}: {value} is not a multiple of {divisor_key} {divisor}; pick sizes that divide"
            )

    def batch(section: str, s: SftCommon | DpoParams) -> None:
        """An integer batch_size with gradient_accumulation, or auto with effective_batch."""
        positive(f"{section}.gradient_accumulation", s.gradient_accumulation)
        positive(f"{section}.effective_batch", s.effective_batch)
        rows(f"{section}.batch_size", s.batch_size, auto=True)
        rows(f"{section}.gradient_accumulation", s.gradient_accumulation, "a gradient_accumulation")
        rows(f"{section}.effective_batch", s.effective_batch)
        if s.batch_size is BatchSize.AUTO:
            if s.effective_batch is None:
                problems.append(
                    f"{section}.effective_batch: null, but {section}.batch_size: auto needs it; set it to "
                    f"the rows per optimizer step to keep (e.g. 16), or give {section}.batch_size an integer"
                )
            if s.gradient_accumulation is not None and s.gradient_accumulation != 1:
                problems.append(
                    f"{section}.gradient_accumulation: {s.gradient_accumulation} with {section}.batch_size: "
                    f"auto, which derives it (effective_batch / the micro-batch that fits); set it to 1 and "
                    f"{section}.effective_batch to the rows per optimizer step"
                )
            return
        positive(f"{section}.batch_size", s.batch_size)
        if s.batch_size is not None and s.effective_batch is not None:
            accumulation = s.gradient_accumulation if s.gradient_accumulation is not None else "?"
            problems.append(
                f"{section}.effective_batch: {s.effective_batch} is only read with batch_size: auto; set "
                f"{section}.batch_size: auto (and gradient_accumulation: 1), or remove effective_batch (with "
                f"an integer batch_size the effective batch is batch_size × gradient_accumulation = "
                f"{s.batch_size} × {accumulation})"
            )

    b, pr, ev = p.base, p.prepare, p.evaluate
    seed("base.seed", b.seed)
    positive("base.threads", b.threads, zero_ok=True)
    tr = b.train
    for name in ("max_steps", "batch_size", "learning_rate"):
        positive(f"base.train.{name}", getattr(tr, name))
    for name in ("warmup_steps", "weight_decay", "save_steps"):
        positive(f"base.train.{name}", getattr(tr, name), zero_ok=True)
    for name in ("max_steps", "warmup_steps", "save_steps"):
        steps(f"base.train.{name}", getattr(tr, name))
    rows("base.train.batch_size", tr.batch_size)
    t = b.tiny
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
        positive(f"base.tiny.{name}", getattr(t, name))
    if t.vocab_size is not None and t.vocab_size < MIN_VOCAB:
        problems.append(
            f"base.tiny.vocab_size: must be >= {MIN_VOCAB} (256 byte symbols and 5 special tokens), "
            f"got {t.vocab_size}"
        )
    divides("base.tiny.image_size", t.image_size, "base.tiny.patch_size", t.patch_size)
    divides("base.tiny.vision_hidden", t.vision_hidden, "base.tiny.vision_heads", t.vision_heads)
    divides("base.tiny.text_hidden", t.text_hidden, "base.tiny.text_heads", t.text_heads)
    if t.text_hidden and t.text_heads and t.text_hidden > 0 and t.text_heads > 0:
        head = t.text_hidden / t.text_heads
        if head.is_integer() and head % 2:
            problems.append(
                f"base.tiny.text_hidden: head size {t.text_hidden}/{t.text_heads} = {int(head)} is odd; "
                "rotary position embeddings rotate pairs of dimensions, so pick an even head size"
            )
    if b.model is ModelKind.HUB and not b.hub_id:
        problems.append("base.hub_id: empty; name the hub model (e.g. llava-hf/llava-1.5-7b-hf) or a folder")
    if b.model is ModelKind.HUB and b.hub_id and b.revision == "" and not Path(b.hub_id).is_dir():
        problems.append(
            f"base.revision: empty; pin a commit of {b.hub_id} so the study is reproducible "
            "(`python -m posttrain pin` fills it in; a local folder needs none)"
        )
    if b.model is ModelKind.TINY and pr.source is not None and not pr.source.has_pretrain_pool:
        problems.append(
            f"base.model: 'tiny' trains from scratch on the synthetic pretrain pool, but "
            f"prepare.source is {pr.source.value!r}; use base.model: hub or prepare.source: synthetic"
        )

    seed("prepare.seed", pr.seed)
    within("prepare.max_bad_fraction", pr.max_bad_fraction, 0, 1)
    s = pr.synthetic
    for name in ("image_size", "pretrain_images", "study_images", "questions_per_image"):
        positive(f"prepare.synthetic.{name}", getattr(s, name))
    if (
        b.model is ModelKind.TINY
        and pr.source is DataSource.SYNTHETIC
        and None not in (s.image_size, t.image_size)
        and s.image_size != t.image_size
    ):
        problems.append(
            f"prepare.synthetic.image_size: {s.image_size} differs from base.tiny.image_size "
            f"{t.image_size}; make them equal"
        )
    for pool in ("pretrain", "study"):
        n, n_test = getattr(s, f"{pool}_images"), getattr(s, f"{pool}_test_images")
        if n_test is not None and not (0 < n_test and (n is None or n_test < n)):
            problems.append(
                f"prepare.synthetic.{pool}_test_images: {n_test} must be > 0 and below "
                f"prepare.synthetic.{pool}_images ({n})"
            )
    for name in ("negative_fraction", "followup_fraction"):
        within(f"prepare.synthetic.{name}", getattr(s, name), 0, 1)
    positive("prepare.lrv.test_images", pr.lrv.test_images)
    if pr.source is DataSource.LRV_CHART and not pr.lrv.local_parquet and pr.lrv.revision == "":
        problems.append("prepare.lrv.revision: empty; pin a dataset commit, or set prepare.lrv.local_parquet")

    sc = p.sft.common
    for name in ("rank", "max_steps", "learning_rate"):
        positive(f"sft.common.{name}", getattr(sc, name))
    batch("sft.common", sc)
    for name in ("warmup_steps", "weight_decay", "save_steps"):
        positive(f"sft.common.{name}", getattr(sc, name), zero_ok=True)
    for name in ("max_steps", "warmup_steps", "save_steps"):
        steps(f"sft.common.{name}", getattr(sc, name))
    within("sft.common.replay_fraction", sc.replay_fraction, 0, 0.9)
    if sc.target_modules is not None and not sc.target_modules:
        problems.append(
            "sft.common.target_modules: empty; name the language-model layers to adapt, e.g. q_proj"
        )
    for i, module in enumerate(sc.target_modules or ()):
        if module == "":
            problems.append(f"sft.common.target_modules[{i}]: empty; name a layer, e.g. q_proj")
    if p.sft.variants is not None and not p.sft.variants:
        problems.append(
            "sft.variants: empty; define at least one variant (e.g. sft1: {alpha: 16, dropout: 0.05})"
        )
    for name, v in (p.sft.variants or {}).items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ROLES:
            problems.append(
                f"sft.variants.{name}: variant names must match [a-z][a-z0-9_]* (no dots: PEFT adapter "
                f"names) and not be one of {sorted(ROLES)}"
            )
        positive(f"sft.variants.{name}.alpha", v.alpha)
        within(f"sft.variants.{name}.dropout", v.dropout, 0, 1, "[)")
    if sc.quantization is not None and sc.quantization.needs_cuda and b.model is ModelKind.TINY:
        problems.append(
            "sft.common.quantization: nf4 quantizes a hub model on CUDA; the tiny model trains in full "
            "precision (use quantization: none)"
        )

    en = p.ensemble
    positive("ensemble.svd_rank", en.svd_rank, zero_ok=True)
    within("ensemble.density", en.density, 0, 1, "(]")

    pf, dp = p.preferences, p.dpo
    for name in ("temperature", "max_new_tokens", "batch_size", "min_pairs"):
        positive(f"preferences.{name}", getattr(pf, name))
    positive("preferences.max_prompts", pf.max_prompts, zero_ok=True)
    rows("preferences.batch_size", pf.batch_size, auto=True)
    within("preferences.top_p", pf.top_p, 0, 1, "(]")
    seed("preferences.seed", pf.seed)
    if pf.judge is not None and pf.judge.needs_critic_model and ev.critic.model == "":
        problems.append(
            "preferences.judge: 'critic' needs evaluate.critic.model (a transformers-format "
            "LLaVA-Critic); set it or use judge: self / reference"
        )
    if pf.keep is not None and pf.keep.needs_reference_judge and pf.judge is not Judge.REFERENCE:
        problems.append(
            "preferences.keep: 'correctness' keeps the pairs the ground truth orders by correctness, "
            "which is the reference judge's verdict; with preferences.judge: "
            f"{pf.judge.value if pf.judge else None} use keep: decisive, or judge: reference"
        )
    for name in ("beta", "learning_rate", "epochs", "rounds"):
        positive(f"dpo.{name}", getattr(dp, name))
    batch("dpo", dp)
    positive("dpo.warmup_steps", dp.warmup_steps, zero_ok=True)
    positive("dpo.save_steps", dp.save_steps, zero_ok=True)
    steps("dpo.warmup_steps", dp.warmup_steps)
    steps("dpo.save_steps", dp.save_steps)
    within("dpo.heldout_fraction", dp.heldout_fraction, 0, 0.5, "[)")
    positive("dpo.sft_weight", dp.sft_weight, zero_ok=True)
    if dp.label_smoothing is not None and not 0 <= dp.label_smoothing < 0.5:
        problems.append(f"dpo.label_smoothing: {dp.label_smoothing} is not in [0, 0.5)")
    elif dp.loss_type is not None and dp.loss_type.needs_label_smoothing and dp.label_smoothing == 0:
        problems.append(
            "dpo.loss_type: 'robust' with dpo.label_smoothing 0 is plain DPO; set dpo.label_smoothing to the "
            "share of verdicts you expect to be wrong (e.g. 0.1), or use loss_type: sigmoid"
        )

    for name in ("batch_size", "max_new_tokens", "resamples"):
        positive(f"evaluate.{name}", getattr(ev, name))
    seed("evaluate.seed", ev.seed)
    rows("evaluate.batch_size", ev.batch_size, auto=True)
    for name in ("batch_size", "max_new_tokens"):
        positive(f"evaluate.critic.{name}", getattr(ev.critic, name))
    rows("evaluate.critic.batch_size", ev.critic.batch_size)
    if ev.critic.kind is not None and ev.critic.kind.needs_model and ev.critic.model == "":
        problems.append(
            "evaluate.critic.model: empty; give a transformers-format LLaVA-Critic folder or hub id "
            "(or use evaluate.critic.kind: reference)"
        )
    positive("launch.processes", p.launch.processes)
    # the report compares the models the pipeline evaluates (dvc.yaml's evaluate stages)
    evaluated = pipeline_models(p) if p.sft.variants is not None else None
    if evaluated and p.report.baseline is not None and p.report.baseline not in evaluated:
        problems.append(
            f"report.baseline: {_shown(p.report.baseline)} is not a model the pipeline evaluates "
            f"({', '.join(evaluated)}); pick one of them"
        )
    positive("report.examples", p.report.examples, zero_ok=True)
    positive("report.resamples", p.report.resamples)
    seed("report.seed", p.report.seed)


def parse_params(data: dict, source: str = "params") -> Params:
    """Build and validate `Params` from a mapping; raise one `ParamsError` listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ParamsError([f"top level: expected a mapping of sections, got {type(data).__name__}"], source)
    params = _build(Params, data, "params", problems)
    problems = [p.removeprefix("params.") for p in problems]
    _check(params, problems)
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
                    f"line {event.start_mark.line + 1}: the alias *{_cut(event.anchor)} refers to the "
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
