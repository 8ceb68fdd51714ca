"""The stages pin the CPU float paths before torch loads: the same kernels on CPUs of other makes."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from posttrain.runtime import CPU_NUMERICS


def test_setup_pins_the_cpu_float_paths_before_torch_loads():
    probe = (
        "import os; from posttrain.runtime import CPU_NUMERICS, setup; setup(1); import torch; "
        "print(torch.backends.cpu.get_cpu_capability(), *(os.environ[k] for k in sorted(CPU_NUMERICS)))"
    )
    env = {k: v for k, v in os.environ.items() if k not in CPU_NUMERICS}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    capability, *values = out.stdout.split()
    assert capability == "AVX2"  # also on an AVX-512 machine, where torch would pick AVX512 by itself
    assert values == [CPU_NUMERICS[k] for k in sorted(CPU_NUMERICS)]


def _probe(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout


def test_without_cuda_peft_loads_and_adapts_without_importing_bitsandbytes():
    """bitsandbytes serves only nf4, which needs CUDA: a CPU stage skips its import; LoRA still works."""
    pytest.importorskip("bitsandbytes")
    out = _probe(
        "import sys, torch; torch.cuda.is_available = lambda: False\n"
        "from posttrain.runtime import setup; setup(1)\n"
        "import peft\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "p = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=['0']))\n"
        "n = sum(x.numel() for x in p.parameters() if x.requires_grad)\n"
        "print(sys.modules['bitsandbytes'] is None, n)"
    )
    assert out.split() == ["True", "16"]  # A (2×4) and B (4×2)


def test_with_cuda_bitsandbytes_stays_importable():
    pytest.importorskip("bitsandbytes")
    out = _probe(
        "import sys, torch; torch.cuda.is_available = lambda: True\n"
        "from posttrain.runtime import setup; setup(1)\n"
        "print('bitsandbytes' in sys.modules)"  # not blocked (its CUDA backend cannot load under the fake)
    )
    assert out.split() == ["False"]
