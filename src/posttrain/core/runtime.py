"""What every command shares: CPU threads, quiet third-party output, and input errors as messages alone."""

from __future__ import annotations

import os
import platform
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

from posttrain.core.errors import InputError

# transformers 5 deprecates the gradient_checkpointing names for activation_checkpointing ones. The Trainer
# arguments warn even when checkpointing is off (the flag is passed as False), and TRL's DPO reads the old
# property on every step; the names still work until v6, so the warnings say nothing to act on here.
DEPRECATED_CHECKPOINTING = (
    r"`(is_)?gradient_checkpointing(_kwargs)?` is deprecated and will be removed in v6\."  # from the start
)


# The CPU float paths, pinned to one instruction set so that machines of other makes (AVX-512 or not, Intel or
# AMD) run the same kernels: ATen's vectorized ops, oneDNN's JIT kernels, MKL's BLAS (conditional numerical
# reproducibility). They act only if set before torch is imported; a value the user set is kept, and
# POSTTRAIN_CPU_NUMERICS=native leaves every path to the libraries (tests/test_invariance.py, opt-in with
# `pytest -m invariance`, compares the two).
CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
# numpy's OpenBLAS (built for every x86 CPU, picking at load) likewise: on an AVX-512 CPU it takes its
# SkylakeX kernels, whose matrix products round otherwise in the last digit (the report's bootstrap CIs).
# Haswell's are the AVX2 set that AMD's Zen picks too. Read when numpy loads: `posttrain/__init__.py` sets
# it, since every entry point imports the package before numpy.
BLAS_NUMERICS = {"OPENBLAS_CORETYPE": "Haswell"}
# CUDA's caching allocator keeps freed blocks for reuse; a generation batch whose KV cache grows token by
# token left 11 GiB of them reserved but unusable on an 80 GB H100 (issue 33). Expandable segments grow a
# block in place instead. Read at the first CUDA allocation; a value the user set is kept.
CUDA_ALLOCATOR = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def pin_blas_numerics() -> None:
    """Pin numpy's OpenBLAS kernels (`BLAS_NUMERICS`) on an x86 CPU, if numpy is not loaded yet."""
    if "numpy" in sys.modules or os.environ.get("POSTTRAIN_CPU_NUMERICS") == "native":
        return
    if platform.machine().lower() in ("x86_64", "amd64"):
        for key, value in BLAS_NUMERICS.items():
            os.environ.setdefault(key, value)


def hide_bitsandbytes_without_cuda() -> None:
    """Without a CUDA GPU, make bitsandbytes look absent to PEFT and transformers.

    nf4 (the only use of bitsandbytes here) needs CUDA and is refused without it; PEFT and transformers'
    Trainer import it anyway when it is installed: 2–3 s of every stage's start on a CPU, and on a CPU with
    AVX512-BF16 a "Failed to load CPU gemm_4bit_forward from kernels-community" warning. A None entry makes
    `importlib.util.find_spec` (their check) report it absent. `setup` calls this, and so do the modules that
    import the Trainer at their top, since the e2e runner and the benchmarks import them before `setup`.
    """
    import torch

    if not torch.cuda.is_available():
        sys.modules.setdefault("bitsandbytes", None)


def setup(threads: int) -> str:
    """Pin the CPU float paths, set torch's CPU threads (0 keeps torch's default), ask CUDA's allocator for
    expandable segments, silence library noise, and without a CUDA GPU keep PEFT from importing bitsandbytes.

    Returns:
        The device name, ``cuda`` or ``cpu``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key, value in CUDA_ALLOCATOR.items():
        os.environ.setdefault(key, value)
    if "torch" not in sys.modules and os.environ.get("POSTTRAIN_CPU_NUMERICS") != "native":
        for key, value in CPU_NUMERICS.items():
            os.environ.setdefault(key, value)
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    hide_bitsandbytes_without_cuda()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=DEPRECATED_CHECKPOINTING, category=FutureWarning)
    from posttrain.core.distributed import init

    init()  # started by torchrun as one of several processes (`posttrain.launch`): join the group
    return "cuda" if torch.cuda.is_available() else "cpu"


def exit_status(main: Callable[[], int | None]) -> int:
    """Run a command's `main` and return its exit status; an `InputError` is printed alone and gives 1.

    Once `main` has returned, a process started as one of several leaves its process group
    (`posttrain.core.distributed.leave`) so that it exits cleanly.

    A typo in params.yaml or a bad data file is for the user to fix, not a bug: its message names the key or
    row and the fix, and a traceback would bury it. Every other exception keeps its traceback.

    Args:
        main: The command; it returns its exit status (None counts as 0).

    Returns:
        The exit status.
    """
    try:
        status = main() or 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "torch" in sys.modules:  # a command that never imported torch joined no group
        from posttrain.core.distributed import leave

        leave()
    return status


def run_command(main: Callable[[], int | None]) -> NoReturn:
    """Exit with `exit_status` of `main`: the ``if __name__ == "__main__"`` line of every stage script."""
    sys.exit(exit_status(main))
