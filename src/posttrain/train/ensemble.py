"""The `ensemble` stage's work: combine the SFT adapters into one adapter (SFTe).

With PEFT's `add_weighted_adapter`, only some combinations are the average *model*. LoRA variant i adds
ΔW_i = s_i·B_i·A_i (s_i = alpha_i / r_i). The average model adds mean_i ΔW_i. `cat` stacks the ranks,
A = [w·s_1·A_1; …; w·s_N·A_N], B = [B_1 … B_N], so B·A = Σ w·s_i·B_i·A_i exactly (rank Σ r_i, scaling 1).
`linear` averages A and B separately, (Σ w·√s_i·B_i)(Σ w·√s_i·A_i), which has cross terms B_i·A_j: not the
average model (kept for the study's ablation). `svd` factorises the averaged delta, exact when its rank is at
least Σ r_i. `ties` trims and sign-elects the deltas (Yadav et al. 2023, TIES-Merging) before an SVD.

PEFT builds the combined adapter in the dtype of the base layers it sits on: on a bf16 base the exact `cat`
is rounded to bf16 (relative error ~2e-3 in ΔW). The base is therefore loaded in fp32 here on every device,
and the error of the saved adapter against the members' average is measured (`average_delta_error`) and
recorded, so ``exact_average`` in the provenance is a measurement, not a claim about the method.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from posttrain.core.config import EnsembleMethod, EnsembleParams, to_dict
from posttrain.core.io import atomic_dir
from posttrain.models.loading import (
    ADAPTER_WEIGHTS,
    base_fingerprint,
    check_adapters,
    load_base,
    read_provenance,
    trained_quantization,
    write_provenance,
)

ENSEMBLE = "ensemble"
EXACT_TOLERANCE = 1e-5  # relative error of ΔW that fp32 rounding stays below (cat: ~1e-7 measured)
_PEFT_COMBINATION = {
    EnsembleMethod.CAT: "cat",
    EnsembleMethod.SVD: "svd",
    EnsembleMethod.LINEAR: "linear",
    EnsembleMethod.TIES: "ties_svd",
}


def adapter_rank(folder: Path) -> int:
    return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])


def adapter_deltas(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each adapted layer's (B, A, scaling) of the adapter in `folder`: its ΔW is scaling · B · A."""
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ValueError(f"{folder}: DoRA adapters are not combined here")
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    weights = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    return {
        key.removesuffix(".lora_A.weight"): (weights[key.replace("lora_A", "lora_B")], weights[key], scaling)
        for key in weights
        if key.endswith(".lora_A.weight")
    }


def _frobenius_squared(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """||Σ_k c_k·B_k·A_k||²_F without forming the (out, in) matrix: trace((UᵀU)(VVᵀ)) with U = [B_k],
    V = [c_k·A_k].

    U is (out, R) and V (R, in) with R the summed ranks, so the cost is (out + in) · R², in float64.
    """
    u = torch.cat([b.double() for b, _, _ in factors], dim=1)  # (out, R)
    v = torch.cat([c * a.double() for _, a, c in factors], dim=0)  # (R, in)
    return float(torch.trace((u.T @ u) @ (v @ v.T)))


def average_delta_error(combined: Path, members: list[Path]) -> float:
    """The largest relative error, over the adapted layers, of the combined adapter's ΔW against the members'
    average ΔW: max over layers of ||ΔW_c − (1/N)·Σ ΔW_i||_F / ||(1/N)·Σ ΔW_i||_F.

    0 up to float rounding for `cat` and full-rank `svd` built in fp32; ~2e-3 for `cat` built on a bf16
    base; ~0.8 for `linear` (DESIGN.md trap 3).
    """
    ours = adapter_deltas(combined)
    theirs = [adapter_deltas(m) for m in members]
    w = 1.0 / len(members)
    errors = []
    for layer, (b, a, c) in ours.items():
        average = [(mb, ma, w * mc) for m in theirs for mb, ma, mc in [m[layer]]]
        difference = [(b, a, c)] + [(mb, ma, -mc) for mb, ma, mc in average]
        norm = _frobenius_squared(average)
        errors.append((max(_frobenius_squared(difference), 0.0) / norm) ** 0.5 if norm > 0 else 0.0)
    return max(errors)


def check_members(base_dir: Path, members: dict[str, Path], method: EnsembleMethod) -> None:
    """Refuse members that cannot be averaged.

    That is: pickled weights or trained on another base (`check_adapters`), trained on the base held in
    different precisions, or unequal ranks for `linear`.
    """
    if not members:
        raise ValueError("the ensemble needs at least one member adapter")
    check_adapters(base_dir, members)
    held = {n: trained_quantization(d, f"sft@{n}").value for n, d in members.items()}
    if len(set(held.values())) > 1:
        raise ValueError(
            f"members were trained on the base held in different precisions {held}; give every variant the "
            "same sft.common.quantization and rerun `dvc repro sft`"
        )
    ranks = {n: adapter_rank(d) for n, d in members.items()}
    if method.needs_equal_ranks and len(set(ranks.values())) > 1:
        raise ValueError(
            f"ensemble.method 'linear' averages A and B matrices and needs equal ranks, got {ranks}; "
            "use method: cat (exact for any ranks) or give every variant the same sft.common.rank"
        )


def combine(model, members: dict[str, Path], params: EnsembleParams):
    """Load every member into `model` (a plain base model) and combine them into the one adapter `ensemble`.

    Returns:
        The `PeftModel` holding only the combined adapter, active, in eval mode.
    """
    from peft import PeftModel

    names = list(members)
    model = PeftModel.from_pretrained(model, str(members[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(members[n]), adapter_name=n)
    total_rank = sum(adapter_rank(d) for d in members.values())
    kwargs = {}
    if params.method in (EnsembleMethod.SVD, EnsembleMethod.TIES):
        kwargs["svd_rank"] = params.svd_rank or total_rank
    if params.method is EnsembleMethod.TIES:
        kwargs["density"] = params.density
    weights = [1.0 / len(names)] * len(names)
    with torch.no_grad():
        model.add_weighted_adapter(
            names, weights, ENSEMBLE, combination_type=_PEFT_COMBINATION[params.method], **kwargs
        )
    model.set_adapter(ENSEMBLE)
    for n in names:
        model.delete_adapter(n)
    return model.eval()  # merged adapters keep dropout modules: off for evaluation


def members_together(model, members: dict[str, Path]):
    """The average model computed another way: every member active at once, each scaled by 1/N.

    Each adapted layer then adds Σ (1/N)·s_i·B_i·A_i·x, the averaged delta, without building a combined
    adapter or merging anything into the base, so it also works where merging cannot be exact (an nf4
    base). The reference `combine` is checked against (tests on the CPU; `bench/nf4.py` on the nf4 base).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = list(members)
    model = PeftModel.from_pretrained(model, str(members[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(members[n]), adapter_name=n)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for n in names:
                if n in module.scaling:
                    module.scaling[n] /= len(names)
    return model.eval()


def build_ensemble(base_dir: Path, members: dict[str, Path], params: EnsembleParams, out_dir: Path) -> dict:
    """Combine the member adapters and save the result as a single adapter that reloads as ``default``.

    Args:
        base_dir: the `base` stage's folder.
        members: variant name -> adapter folder, in a fixed order.
        params: the ``ensemble`` section.
        out_dir: the ensemble adapter folder, written atomically.

    Returns:
        A summary: method, members, rank, exactness.
    """
    check_members(base_dir, members, params.method)
    # The base only hosts the adapters' modules, but PEFT builds the combined adapter in its layers' dtype:
    # fp32, or bf16 rounds the exact average. On a GPU a 7B base in fp32 takes 28 GB of its memory (the CPU
    # would take minutes).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, _ = load_base(base_dir, device=device, dtype=torch.float32)
    model = combine(model, members, params)
    rank = model.peft_config[ENSEMBLE].r
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp / "peft", selected_adapters=[ENSEMBLE])
        saved = tmp / "peft" / ENSEMBLE  # PEFT nests adapters that are not named "default"
        for f in saved.iterdir():
            shutil.move(str(f), tmp / f.name)
        shutil.rmtree(tmp / "peft")
        error = average_delta_error(tmp, list(members.values()))
        summary = {
            "method": params.method.value,
            "members": list(members),
            "rank": rank,
            "exact_average": error <= EXACT_TOLERANCE,
            "max_relative_delta_error": float(f"{error:.2e}"),  # measured on the saved adapter
        }
        write_provenance(
            tmp,
            kind="adapter",
            name="sfte",
            produced_by="stages/ensemble.py",
            base=str(base_dir),
            base_fingerprint=base_fingerprint(base_dir),
            params=to_dict(params),
            # the members' (all equal, checked above): the base the averaged adapter is meant to sit on
            base_quantization=trained_quantization(members[next(iter(members))], "sft").value,
            ensemble=summary,
            member_provenance={n: read_provenance(d, f"sft@{n}") for n, d in members.items()},
        )
    return summary
