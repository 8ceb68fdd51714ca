"""LoRA dropout for CPU training that draws only the dropped positions (`SparseDropout`)."""

from __future__ import annotations

import math

import torch


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The positions dropout zeroes among `n` elements, each independently with probability `p`.

    Drawn as the gaps between successive dropped positions, which are i.i.d. Geometric(p) (Bernoulli
    trials until the first success; Devroye, *Non-Uniform Random Variate Generation*, 1986, §X.2), each
    ⌊log(1 − U) / log(1 − p)⌋ + 1 of a uniform U (P(gap > k) = (1 − p)^k): about n·p uniform draws instead
    of n. The same distribution as ``torch.bernoulli``, a different random stream.

    Returns:
        (k,) int64, strictly increasing, in [0, n); k ~ Binomial(n, p).
    """
    if n == 0 or p == 0:
        return torch.zeros(0, dtype=torch.long)
    sd = math.sqrt(n * p * (1 - p))
    chunks, end = [], 0  # end: one past the last position drawn so far
    while end < n:  # one pass unless the count lands 8 sd above its mean (~1e-15)
        m = math.ceil((n - end) * p + 8 * sd + 16)
        u = torch.rand(m, dtype=torch.float64, generator=generator)  # [0, 1)
        gaps = torch.floor(torch.log1p(-u) / math.log1p(-p)) + 1  # Geometric(p) by inversion: 1, 2, ...
        positions = end - 1 + gaps.cumsum(0).long()  # (m,)
        chunks.append(positions)
        end = int(positions[-1]) + 1
    positions = torch.cat(chunks)
    return positions[positions < n]


class _ScaleAndZero(torch.autograd.Function):
    """x·s with the elements at flat `positions` zeroed; the gradient likewise.

    Bit for bit x times a mask tensor holding s or 0 (an IEEE product is the same either way), without
    writing that mask: one pass over x and a scatter of the ~n·p zeros, forward and backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return _scale_and_zero(x, positions, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return _scale_and_zero(grad, positions, ctx.scale), None, None


def _scale_and_zero(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    # the scale in x's dtype, as the mask held it; contiguous so flat positions are row-major, as the mask's
    out = (x * torch.tensor(scale, dtype=x.dtype, device=x.device)).contiguous()
    out.view(-1).index_fill_(0, positions, 0)
    return out


class SparseDropout(torch.nn.Module):
    """`torch.nn.Dropout` that draws only the dropped positions (`dropped_positions`).

    On a CPU, ``bernoulli_`` draws one random number per element and took 27% of an SFT step of the tiny
    model (`bench/dropout.py`); at the study's dropouts (0.05, 0.10) this draws a tenth as many or fewer.
    Survivors are scaled by 1/(1 − p) as in ``torch.nn.Dropout``; in eval mode it is the identity.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _ScaleAndZero.apply(x, dropped_positions(x.numel(), self.p).to(x.device), 1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def sparse_lora_dropout(model) -> int:
    """Swap every LoRA dropout of a PEFT `model` for `SparseDropout` of the same p, in place.

    For CPU training: a GPU's fused dropout is already cheap. The adapter's saved weights and config are
    unchanged (dropout has no weights). Returns the number of modules swapped.
    """
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is torch.nn.Dropout:
                dropouts[name] = SparseDropout(layer.p)
                swapped += 1
    return swapped
