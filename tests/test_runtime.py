"""The stages pin the CPU float paths before torch loads: the same kernels on CPUs of other makes."""

import os
import platform
import subprocess
import sys

import pytest
from conftest import ROOT

from posttrain.core.runtime import CPU_NUMERICS, exit_status


def test_setup_pins_the_cpu_float_paths_before_torch_loads():
    probe = (
        "import os; from posttrain.core.runtime import CPU_NUMERICS, setup; setup(1); import torch; "
        "print(torch.backends.cpu.get_cpu_capability(), *(os.environ[k] for k in sorted(CPU_NUMERICS)))"
    )
    env = {k: v for k, v in os.environ.items() if k not in CPU_NUMERICS}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    capability, *values = out.stdout.split()
    assert capability == "AVX2"  # also on an AVX-512 machine, where torch would pick AVX512 by itself
    assert values == [CPU_NUMERICS[k] for k in sorted(CPU_NUMERICS)]


# numpy's bundled OpenBLAS (built DYNAMIC_ARCH) reports the kernel set it picked for this CPU
OPENBLAS_CORE = (
    "import ctypes, glob, os, numpy\n"
    "libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__) + '.libs', '*openblas*'))\n"
    "lib = ctypes.CDLL(libs[0]) if libs else None\n"
    "names = [n for n in ('scipy_openblas_get_corename64_', 'scipy_openblas_get_corename', "
    "'openblas_get_corename64_', 'openblas_get_corename') if lib is not None and hasattr(lib, n)]\n"
    "if names:\n"
    "    f = getattr(lib, names[0]); f.restype = ctypes.c_char_p; print(f().decode())\n"
    "else:\n"
    "    print('unknown')\n"
)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 kernel names")
def test_importing_posttrain_pins_numpy_blas_kernels_before_numpy_loads():
    """The report's bootstrap CIs are numpy matrix products: OpenBLAS picks AVX-512 kernels on a CPU that has
    them, which gave other last digits in metrics/report_compare.json than the committed AVX2 result. Every
    entry point (stages, `python -m posttrain`) imports the package before numpy, so the package pins them.
    """
    probe = "import os, posttrain\n" + OPENBLAS_CORE + "print(os.environ.get('OPENBLAS_CORETYPE'))\n"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "POSTTRAIN_CPU_NUMERICS")}
    env["PYTHONPATH"] = str(ROOT / "src")
    core, pinned = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()[-2:]
    assert pinned == "Haswell"
    if core != "unknown":  # this numpy's OpenBLAS reports its kernels
        assert core == "Haswell"
    native = {**env, "POSTTRAIN_CPU_NUMERICS": "native"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=native, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == "None", "native leaves the pick to OpenBLAS"


def _probe(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize(
    "module",
    ["posttrain.train.trainer", "posttrain.train.base", "posttrain.train.sft", "posttrain.train.checkpoints"],
)
def test_without_cuda_the_training_modules_leave_bitsandbytes_unimported_before_setup(module):
    """The e2e runner and the benchmarks import these before `setup`: transformers' Trainer would import
    bitsandbytes, whose CPU backend prints a kernels-community warning on a CPU with AVX512-BF16 (seen on an
    AMD EPYC and on the GPU machine's Xeon host)."""
    pytest.importorskip("bitsandbytes")
    out = _probe(
        f"import sys, torch; torch.cuda.is_available = lambda: False\nimport {module}\n"
        "print(sys.modules.get('bitsandbytes', 'absent'))\n"
    )
    assert out.split()[-1] in ("None", "absent")


def test_without_cuda_peft_loads_and_adapts_without_importing_bitsandbytes():
    """bitsandbytes serves only nf4, which needs CUDA: a CPU stage skips its import; LoRA still works."""
    pytest.importorskip("bitsandbytes")
    out = _probe(
        "import sys, torch; torch.cuda.is_available = lambda: False\n"
        "from posttrain.core.runtime import setup; setup(1)\n"
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
        "from posttrain.core.runtime import setup; setup(1)\n"
        "print('bitsandbytes' in sys.modules)"  # not blocked (its CUDA backend cannot load under the fake)
    )
    assert out.split() == ["False"]


def test_a_command_leaves_its_process_group_before_the_interpreter_exits(tmp_path):
    """A worker that exits with its gloo group alive can abort at exit ("terminate called without an active
    exception", CI of stop 37): `exit_status` waits for the others and leaves the group after `main`."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert exit_status(lambda: None) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_setup_asks_the_cuda_allocator_for_expandable_segments_before_torch_loads():
    """Issue 33: sampling at 64 prompts × 2 ran out of memory on an 80 GB H100 with 11.15 GiB reserved but
    unallocated, the caching allocator's fragments; expandable segments let it grow blocks instead. A value
    the user set is kept."""
    probe = (
        "import os; from posttrain.core.runtime import setup; setup(1); "
        "print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    env["PYTHONPATH"] = str(ROOT / "src")
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split()[-1] == "expandable_segments:True"
    mine = {**env, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    run = subprocess.run([sys.executable, "-c", probe], env=mine, capture_output=True, text=True, check=True)
    assert run.stdout.split()[-1] == "max_split_size_mb:512"
