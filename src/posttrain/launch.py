"""Run a stage script in one process, or in `launch.processes` processes, as params.yaml says when it runs.

    python -m posttrain.launch stages/evaluate.py --model sft1      # what every dvc.yaml command calls

The setting is read here, when the stage starts: no stage lists ``launch`` among its params and it is in no
command's text, so changing it reruns nothing (DVC reruns a stage whose command or dependencies change).
`dvc exp run -S launch.processes=4` is then all it takes to spread the next stages over four GPUs.

With one process the script replaces this one (``exec``): exactly ``python stages/<stage>.py ...``. With N the
stages that shard their work (`SHARDED`) run under ``torchrun --standalone --nproc_per_node N``, torchrun's
launcher called in this process with the stage's arguments handed over as they are (its argparse never sees
them, so a stage option such as ``--logs`` is not taken for an abbreviation of its ``--logs-specs``): the
training stages (base, SFT, DPO) data-parallel (the Trainer's and TRL's DDP, each process a 1/N share of the
recipe's micro-batch), evaluation, preference sampling and DPO's later rounds with their prompts split over
the processes and gathered in order (`posttrain.core.distributed`). The others (prepare, ensemble, report:
seconds of CPU work) run in one process and say so.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

SHARDED = {"base.py", "sft.py", "dpo.py", "evaluate.py", "preferences.py"}


def command(script: str, args: Sequence[str], processes: int) -> list[str]:
    """The command line that runs `script` with `args` in `processes` processes."""
    if processes == 1 or Path(script).name not in SHARDED:
        return [sys.executable, script, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        script,
        *args,
    ]


def torchrun_args(script: str, args: Sequence[str], processes: int):
    """Torchrun's parsed command line for `command`'s `processes` > 1 case, with `args` set after parsing.

    argparse matches unambiguous prefixes of its options anywhere in a command line, the training script's
    arguments included (torch 2.13: ``--logs`` is "ambiguous: could match --logs-specs, --logs_specs"; a
    prefix of one option alone would be silently taken). Only torchrun's own options are parsed here.
    """
    from torch.distributed.run import parse_args

    launcher = command(script, [], processes)[3:]  # after `python -m torch.distributed.run`
    parsed = parse_args(launcher)
    parsed.training_script_args = list(args)
    return parsed


def params_path(args: Sequence[str]) -> str:
    """The params file the stage will read: its ``--params`` argument, else params.yaml."""
    for i, arg in enumerate(args):
        if arg == "--params" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--params="):
            return arg.split("=", 1)[1]
    return "params.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m posttrain.launch SCRIPT [ARGS...]``: exec the stage as `launch.processes` says."""
    from posttrain.core.config import load_params
    from posttrain.core.runtime import exit_status

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    script, args = argv[0], argv[1:]

    def resolve() -> int:
        processes = load_params(params_path(args)).launch.processes
        if processes > 1 and Path(script).name not in SHARDED:
            print(
                f"launch.processes {processes}: {Path(script).name} runs in one process (the stages that "
                f"shard their work over processes: {', '.join(sorted(SHARDED))})",
                flush=True,
            )
        cmd = command(script, args, processes)
        sys.stdout.flush()
        if cmd[1:3] != ["-m", "torch.distributed.run"]:
            os.execv(cmd[0], cmd)
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import run

        try:
            run(torchrun_args(script, args, processes))
        except ChildFailedError as e:  # the workers printed their own errors
            failures = ", ".join(f"rank {f.local_rank} exit {f.exitcode}" for f in e.failures.values())
            print(f"error: {Path(script).name} failed in {processes} processes ({failures})", file=sys.stderr)
            return 1
        return 0

    return exit_status(resolve)


if __name__ == "__main__":
    sys.exit(main())
