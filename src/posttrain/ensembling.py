"""The `ensemble` stage's work: combine the SFT adapters into one adapter (SFTe).

With PEFT's `add_weighted_adapter`, only some combinations are the average *model*. LoRA variant i adds
ΔW_i = s_i·B_i·A_i (s_i = alpha_i / r_i). The average model adds mean_i ΔW_i. `cat` stacks the ranks,
A = [w·s_1·A_1; …; w·s_N·A_N], B = [B_1 … B_N], so B·A = Σ w·s_i·B_i·A_i exactly (rank Σ r_i, scaling 1).
`linear` averages A and B separately, (Σ w·√s_i·B_i)(Σ w·√s_i·A_i), which has cross terms B_i·A_j: not the
average model (kept for the study's ablation). `svd` factorises the averaged delta, exact when its rank is at
least Σ r_i. `ties` trims and sign-elects the deltas (Yadav et al. 2023, TIES-Merging) before an SVD.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from posttrain.config import EnsembleMethod, EnsembleParams, to_dict
from posttrain.io import atomic_dir
from posttrain.models import (
    base_fingerprint,
    check_adapters,
    load_base,
    read_provenance,
    trained_quantization,
    write_provenance,
)

ENSEMBLE = "ensemble"
_PEFT_COMBINATION = {
    EnsembleMethod.CAT: "cat",
    EnsembleMethod.SVD: "svd",
    EnsembleMethod.LINEAR: "linear",
    EnsembleMethod.TIES: "ties_svd",
}


def adapter_rank(folder: Path) -> int:
    return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])


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
    # The base only hosts the adapters' modules; combining touches LoRA weights alone (fp32 as loaded).
    # On a GPU it loads in bf16 there: a 7B base in fp32 on the CPU takes 28 GB and minutes.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, _ = load_base(
        base_dir, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32
    )
    model = combine(model, members, params)
    rank = model.peft_config[ENSEMBLE].r
    exact = params.method.exact or (
        params.method is EnsembleMethod.SVD and rank >= sum(adapter_rank(d) for d in members.values())
    )
    summary = {"method": params.method.value, "members": list(members), "rank": rank, "exact_average": exact}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp / "peft", selected_adapters=[ENSEMBLE])
        saved = tmp / "peft" / ENSEMBLE  # PEFT nests adapters that are not named "default"
        for f in saved.iterdir():
            shutil.move(str(f), tmp / f.name)
        shutil.rmtree(tmp / "peft")
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
