"""Work split over the processes `torchrun` starts (`posttrain.launch`), and gathered back in order.

A stage started by ``torchrun`` finds its rank and the world size in the environment; `init` joins the process
group (NCCL on CUDA, one GPU per process; gloo on the CPU). The generation stages then give batch k of their
prompts to process k mod N (`my_batches`) and gather every batch's results in the original order
(`gather_batches`): the batches, their padding and their seeds are those of one process, so the outputs are
the same for any N. Only the main process writes outputs (`is_main`).
"""

from __future__ import annotations

import os
import sys


def init() -> None:
    """Join the process group when started as one of several processes (WORLD_SIZE > 1); else nothing."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    die_with_launcher()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def leave() -> None:
    """Wait for every process, then leave the process group (nothing outside one).

    A worker whose gloo or NCCL group is still alive when the interpreter exits can abort there ("terminate
    called without an active exception": the group's threads are destroyed while joinable), and torchrun then
    fails the stage although its work is done. Called once a command's `main` has returned.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this worker when the torchrun that started it dies (Linux).

    torchrun starts each worker in a session of its own: a torchrun killed outright (SIGKILL, the OOM killer)
    would leave them training, writing the outputs and deleting the checkpoints that the stage's rerun
    resumes from. A signal torchrun can catch (Ctrl-C, SIGTERM) it forwards to them itself.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)


def rank_and_size() -> tuple[int, int]:
    """The process's rank and the number of processes; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True in the process that writes outputs (rank 0, or the only process)."""
    return rank_and_size()[0] == 0


def barrier() -> None:
    """Wait for every process (nothing outside a process group)."""
    import torch.distributed as dist

    if rank_and_size()[1] > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's `value` on every process (`value` itself outside a process group)."""
    import torch.distributed as dist

    if rank_and_size()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_process_batch(section: str, batch: int) -> int:
    """The micro-batch each of the processes trains on, so that all of them together take `batch` rows.

    Raises:
        posttrain.core.config.ParamsError: `batch` does not split evenly over the processes.
    """
    from posttrain.core.config import ParamsError

    size = rank_and_size()[1]
    if batch % size:
        raise ParamsError(
            [
                f"{section}.batch_size: the micro-batch {batch} does not split over launch.processes {size}; "
                f"make it a multiple of {size} (gradient_accumulation or effective_batch keeps the recipe)"
            ],
            "params.yaml",
        )
    return batch // size


def my_batches(n_batches: int) -> range:
    """The batch indices this process computes: k with k mod N == rank."""
    rank, size = rank_and_size()
    return range(rank, n_batches, size)


def gather_batches(local: dict[int, list]) -> list:
    """Every process's {batch index: results}, concatenated in batch order (on every process)."""
    import torch.distributed as dist

    rank, size = rank_and_size()
    if size == 1:
        parts = [local]
    else:
        parts = [None] * size
        dist.all_gather_object(parts, local)
    merged = {k: v for part in parts for k, v in part.items()}
    return [item for k in sorted(merged) for item in merged[k]]
