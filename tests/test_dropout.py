"""The CPU dropout of LoRA training: the same law as nn.Dropout, drawn faster."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from posttrain.training import (
    MaskDropout,
    language_model_regex,
    use_mask_dropout,
)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_dropout_keeps_each_element_with_probability_one_minus_p_and_keeps_the_mean(p):
    """Keep probability q = 1 − round(65536·p)/65536 (16 random bits an element), scale 1/q: E[out] = x."""
    torch.manual_seed(0)
    drop = MaskDropout(p).train()
    x = torch.full((400, 1000), 2.0)
    out = drop(x)
    kept = out != 0
    keep = 1 - round(65536 * p) / 65536
    n = x.numel()
    assert abs(kept.float().mean().item() - keep) < 5 * math.sqrt(keep * (1 - keep) / n)
    assert torch.allclose(out[kept], torch.tensor(2.0 / keep))
    assert abs(out.mean().item() - 2.0) < 5 * 2.0 / keep * math.sqrt(keep * (1 - keep) / n)
    # no position is favoured: the share kept is the same in each of the three 16-bit fields of a draw
    flat = kept.flatten()
    third = (n + 2) // 3
    for k in range(3):
        field = flat[k * third : (k + 1) * third].float().mean().item()
        assert abs(field - keep) < 5 * math.sqrt(keep * (1 - keep) / third)


def test_mask_dropout_is_the_identity_in_eval_and_masks_the_gradient_in_training():
    drop = MaskDropout(0.3)
    x = torch.randn(5, 7, 11, requires_grad=True)
    assert drop.eval()(x) is x
    torch.manual_seed(1)
    out = drop.train()(x)
    out.sum().backward()
    kept = out.detach() != 0
    assert torch.allclose(x.grad, kept.float() * drop.scale)
    torch.manual_seed(1)
    assert torch.equal(drop(x), out), "seeded like every other draw of the run (resumes restore the RNG)"


def test_use_mask_dropout_replaces_the_lora_dropouts(tiny, prepared, tmp_path):
    model, processor = tiny
    regex = language_model_regex(("q_proj", "v_proj", "down_proj"))
    peft = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=regex)
    )
    replaced = use_mask_dropout(peft)
    drops = [d for m in peft.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert replaced == len(drops) > 0 and all(isinstance(d, MaskDropout) and d.p == 0.1 for d in drops)
    no_dropout = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=regex))
    assert use_mask_dropout(no_dropout) == 0  # dropout 0 is PEFT's Identity: nothing to replace
