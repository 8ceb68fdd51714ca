"""The stages pin the CPU float paths before torch loads: the same kernels on CPUs of other makes."""

import os
import subprocess
import sys

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
