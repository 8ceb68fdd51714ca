"""Where each pipeline model and its training curves live, and which `dvc.yaml` stages write and evaluate it.

The models are ``base``, the SFT variants (the keys of ``sft.variants``, in params order), ``sfte`` and
``sfte_dpo``. The variants sit one folder down, ``models/sft/<variant>`` with their curves in
``dvclive/sft/<variant>/plots``, so a stage that needs every variant depends on the folder ``models/sft`` and
a variant added to params.yaml is in it without `dvc.yaml` naming it; the other models are ``models/<name>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.core.config import Params

# the models that are not SFT variants, each written by its own stage
ROLES = ("base", "sfte", "sfte_dpo")
VARIANTS_DIR = "sft"  # under models/ and dvclive/: one folder per variant


def is_variant(name: str) -> bool:
    """True for an SFT variant's name (any name that is not one of `ROLES`)."""
    return name not in ROLES


def model_dir(name: str, models: str | Path = "models") -> Path:
    """The folder of the model `name` under the models root: ``models/sft/<variant>`` or ``models/<name>``."""
    return Path(models) / VARIANTS_DIR / name if is_variant(name) else Path(models) / name


def live_dir(name: str, live: str | Path = "dvclive") -> Path:
    """The DVCLive folder of the training run of `name` (its curves are ``<folder>/plots``)."""
    return Path(live) / VARIANTS_DIR / name if is_variant(name) else Path(live) / name


def pipeline_models(params: Params) -> list[str]:
    """Every model the pipeline trains and evaluates, in report order: base, the variants, sfte, sfte_dpo."""
    return ["base", *params.sft.variants, "sfte", "sfte_dpo"]


def producing_stage(name: str) -> str:
    """The `dvc.yaml` stage that writes the model `name` (for "rerun `dvc repro <stage>`" messages)."""
    return {"base": "base", "sfte": "ensemble", "sfte_dpo": "dpo"}.get(name, f"sft@{name}")


def evaluating_stage(name: str) -> str:
    """The `dvc.yaml` stage that evaluates the model `name`."""
    return f"evaluate_sft@{name}" if is_variant(name) else f"evaluate@{name}"
