"""SparseDropout: CPU training's LoRA dropout, drawn as geometric gaps instead of one coin per element."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from posttrain.models.family import LLAVA_15
from posttrain.train.dropout import SparseDropout, dropped_positions, sparse_lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropped_positions_are_bernoulli_p(p):
    """Each of n positions is dropped with probability p, independently.

    The count is Binomial(n, p): within 5 standard deviations of n·p. Independence shows in the gaps:
    P(gap = 1) = p and P(gap = 2) = (1 − p)·p for Geometric(p) gaps; an evenly spread mask (gap 1/p
    every time) or a clumped one fails them.
    """
    n = 400_000
    g = torch.Generator().manual_seed(0)
    pos = dropped_positions(n, p, g)
    assert pos.dtype == torch.long and pos.ndim == 1
    assert int(pos.min()) >= 0 and int(pos.max()) < n
    assert bool((pos.diff() > 0).all()), "strictly increasing: no position twice"
    sd = math.sqrt(n * p * (1 - p))
    assert abs(len(pos) - n * p) < 5 * sd
    gaps = pos.diff()
    k = len(gaps)
    for gap, prob in ((1, p), (2, (1 - p) * p)):
        share = float((gaps == gap).sum()) / k
        assert abs(share - prob) < 5 * math.sqrt(prob * (1 - prob) / k), (gap, share, prob)


def test_dropped_positions_edges_and_seed():
    assert dropped_positions(0, 0.1).numel() == 0
    assert dropped_positions(100, 0.0).numel() == 0
    a = dropped_positions(10_000, 0.1, torch.Generator().manual_seed(3))
    b = dropped_positions(10_000, 0.1, torch.Generator().manual_seed(3))
    c = dropped_positions(10_000, 0.1, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # p near 1: nearly every position, each once, in order
    pos = dropped_positions(50, 0.99, torch.Generator().manual_seed(0))
    assert torch.equal(pos, pos.unique()) and 45 <= len(pos) <= 50 and int(pos.max()) < 50


def test_sparse_dropout_zeroes_or_scales_and_its_gradient_is_the_mask():
    """y = x·m/(1 − p) with m ∈ {0, 1}: the gradient of sum(y) is m/(1 − p), and eval mode is the identity."""
    p = 0.25
    layer = SparseDropout(p)
    x = torch.rand(64, 33, 17) + 1.0  # no zeros: a zero output means dropped
    x.requires_grad_(True)
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / (1 - p))
    torch.manual_seed(0)
    assert torch.equal(layer(x.detach()), y.detach()), "the same seed gives the same mask"
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SparseDropout(1.0)


def test_sparse_dropout_equals_the_mask_product_bit_for_bit_without_building_the_mask():
    """The output and gradient are x·s and g·s zeroed at the dropped positions: bit for bit what multiplying
    by a full mask tensor (s or 0 at each element) gives, from the same draws, so the pipeline's metrics do
    not move (`bench/dropout.py` times the two).
    """
    p = 0.1
    x = torch.randn(32, 97, 128, requires_grad=True)
    g = torch.randn(32, 97, 128)
    torch.manual_seed(5)
    y = SparseDropout(p)(x)
    y.backward(g)
    torch.manual_seed(5)
    mask = torch.full((x.numel(),), 1 / (1 - p))
    mask[dropped_positions(x.numel(), p)] = 0
    mask = mask.view(x.shape)
    assert torch.equal(y, x.detach() * mask)
    assert torch.equal(x.grad, g * mask)


def test_sparse_lora_dropout_swaps_every_lora_dropout_and_keeps_the_adapter(tiny):
    model, _ = tiny
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LLAVA_15.lora_regex(("q_proj", "up_proj"))
    )
    peft = get_peft_model(copy.deepcopy(model), lora)
    before = {n: t.clone() for n, t in peft.state_dict().items()}
    n_lora = sum(1 for m in peft.modules() if hasattr(m, "lora_A"))
    assert sparse_lora_dropout(peft) == n_lora > 0
    assert not any(type(m) is torch.nn.Dropout for m in peft.modules())
    assert all(m.p == 0.1 for m in peft.modules() if isinstance(m, SparseDropout))
    after = peft.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    # no dropout configured: PEFT's Identity stays
    plain = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=LLAVA_15.lora_regex(("q_proj",)))
    )
    assert sparse_lora_dropout(plain) == 0


def test_the_dropout_benchmark_times_both_and_finds_each_ones_ops(
    base_dir, prepared, micro_params_file, tmp_path
):
    """`bench/dropout.py` runs on a micro base and finds each dropout's own ops in its step's profile."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "dropout.json"
    cmd = [sys.executable, str(ROOT / "bench/dropout.py"), "--steps", "2", "--params", str(micro_params_file)]
    cmd += ["--base", str(base_dir), "--data", str(prepared), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert result["lora_layers"] > 0 and result["steps"] == 2
    for kind in ("dropout", "sparse"):
        assert result[kind]["median_step_ms"] > 0
        assert 0 < result[kind]["dropout_share_of_step_cpu"] < 1
