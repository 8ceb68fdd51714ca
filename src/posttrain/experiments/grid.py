"""Ablation grids across GPUs: every experiment of a grid on a GPU group of its own, several at once.

    python -m posttrain grid -S sft.variants.sft1.alpha=4,8,16,32 --gpus 0,1 --gpus 2,3
    python -m posttrain grid -S dpo.beta=0.05,0.1 -S dpo.learning_rate=1e-5,2e-5 --gpus 0 --gpus 1
    python -m posttrain grid -S sft.common.max_steps=400,800 --target evaluate_sft@sft1   # only what it needs

DVC's own queue does not do this: the workers of ``dvc queue start -j N`` share one environment, so no GPU
of their own, and race each other (treeverse/dvc#10673). Here each experiment of the grid (every combination
of the ``-S`` values) runs as

    CUDA_VISIBLE_DEVICES=<group> dvc --wait-for-lock exp run --temp -n NAME -S ... \
        -S launch.processes=<size> [TARGET ...]

in a temporary copy of the workspace, sharing the DVC cache and run cache. DVC holds its repo lock only for
the bookkeeping at an experiment's start and end; ``--wait-for-lock`` makes concurrent experiments take it in
turn (without it they fail with "Unable to acquire lock"). One worker per group takes the next experiment
when its last one ends. With ``--target`` stages (e.g. ``evaluate_sft@sft1``) each experiment reproduces only
those and what they depend on, as ``dvc exp run TARGET`` does. Every experiment's params are validated before
any starts. Each experiment's output
goes to ``logs/grid/NAME.log``; a line per experiment says where it ran, how long it took, whether it failed.

The results are ordinary DVC experiments: ``dvc exp show``, ``dvc metrics diff``, ``dvc exp apply`` and
``dvc exp branch`` work on them as on any other, and ``python -m posttrain table`` reads them back per study
family (`posttrain.experiments.table`).
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.core.config import ParamsError, parse_params


@dataclass
class Experiment:
    name: str
    overrides: dict[str, str]  # dotted params key -> value as typed (YAML)


@dataclass
class Outcome:
    name: str
    gpus: str  # the group's CUDA_VISIBLE_DEVICES ("" : the environment's own)
    returncode: int
    seconds: float
    log: Path | None = None


def parse_settings(settings: Sequence[str]) -> list[dict[str, str]]:
    """``key=v1,v2`` settings -> every combination, one {key: value} per experiment, in the order given.

    Raises:
        ParamsError: a setting without ``=``, a key given twice, or an empty value.
    """
    problems, axes = [], {}
    for s in settings:
        key, sep, values = s.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"-S {s}: expected KEY=VALUE[,VALUE...], e.g. -S dpo.beta=0.05,0.1")
            continue
        if key in axes:
            problems.append(f"-S {key}: given twice; list its values once, comma-separated")
            continue
        parts = [v.strip() for v in values.split(",")]
        if not all(parts):
            problems.append(f"-S {s}: an empty value; separate the values with single commas")
            continue
        axes[key] = parts
    if problems:
        raise ParamsError(problems, "the command line")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def experiment_names(prefix: str, grid: list[dict[str, str]]) -> list[str]:
    """A readable, unique DVC experiment name per combination: ``<prefix>-alpha8-beta0.05``.

    Each key is shortened to its last part unless two keys share it (then the whole dotted key is used).
    """
    keys = list(grid[0]) if grid else []
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
    names = []
    for overrides in grid:
        parts = [f"{short[k]}{v}" for k, v in overrides.items()]
        names.append(re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join([prefix, *parts])))
    return names


def set_key(data: dict, key: str, value, source: str) -> str | None:
    """Set the dotted `key` of the params mapping to `value`; a problem message if the key does not exist."""
    node, parts = data, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none: it is a value"
            return f"-S {key}: {source} has no key {part!r} under {where} (its keys: {known})"
        if i == len(parts) - 1:
            node[part] = value
        node = node[part]
    return None


def check_experiments(params_file: Path, experiments: list[Experiment]) -> None:
    """Validate every experiment's params (the file with its overrides) before any experiment starts.

    Raises:
        ParamsError: every problem of every experiment at once, each naming the experiment and the key.
    """
    base = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    problems = []
    for e in experiments:
        data = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
        missing = [set_key(data, k, yaml.safe_load(v), str(params_file)) for k, v in e.overrides.items()]
        missing = [m for m in missing if m]
        if missing:
            problems += missing
            continue
        try:
            parse_params(data, e.name)
        except ParamsError as err:
            problems += [f"{e.name}: {p}" for p in err.problems]
    if problems:
        raise ParamsError(sorted(set(problems), key=problems.index), str(params_file))


def dvc_command(e: Experiment, processes: int | None, targets: Sequence[str] = ()) -> list[str]:
    """The `dvc exp run` of one experiment; `processes`: its group's GPUs as ``launch.processes``; `targets`:
    the stages to reproduce (none: the whole pipeline).
    """
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "exp", "run", "--temp", "-n", e.name]
    for k, v in e.overrides.items():
        cmd += ["-S", f"{k}={v}"]
    if processes is not None and "launch.processes" not in e.overrides:
        cmd += ["-S", f"launch.processes={processes}"]
    return cmd + list(targets)


def run_grid(
    experiments: list[Experiment],
    groups: Sequence[str],
    run_one: Callable[[Experiment, str], tuple[int, Path | None]],
) -> list[Outcome]:
    """Run `experiments` with one worker per GPU group, each taking the next experiment when it is free.

    `run_one(experiment, group)` runs one experiment on a group (``"0,1"``; ``""`` for the environment's
    own devices) and returns its exit status and log. A failed experiment does not stop the others.

    Returns:
        One outcome per experiment, in the order of `experiments`.
    """
    todo: queue.Queue[Experiment] = queue.Queue()
    for e in experiments:
        todo.put(e)
    outcomes: dict[str, Outcome] = {}
    lock = threading.Lock()

    def worker(group: str) -> None:
        where = f"GPUs {group}" if group else "this machine's devices"
        while True:
            try:
                e = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                print(f"[grid] {e.name} on {where}: started", flush=True)
            t0 = time.perf_counter()
            try:
                code, log = run_one(e, group)
            except Exception as err:  # a runner that cannot start (e.g. no dvc) fails this experiment only
                code, log = 1, None
                print(f"[grid] {e.name}: could not start: {err}", flush=True)
            seconds = time.perf_counter() - t0
            with lock:
                outcomes[e.name] = Outcome(e.name, group, code, seconds, log)
                status = "done" if code == 0 else f"FAILED (exit {code})" + (f", see {log}" if log else "")
                print(f"[grid] {e.name} on {where}: {status} in {seconds:.0f}s", flush=True)

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [outcomes[e.name] for e in experiments]


def dvc_runner(repo: Path, log_dir: Path, targets: Sequence[str] = ()) -> Callable[[Experiment, str], tuple]:
    """`run_grid`'s runner through `dvc_command`, the group in CUDA_VISIBLE_DEVICES, output to a log file."""

    def run_one(e: Experiment, group: str) -> tuple[int, Path]:
        env = dict(os.environ)
        if group:
            env["CUDA_VISIBLE_DEVICES"] = group
        processes = len(group.split(",")) if group else None
        log = log_dir / f"{e.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            return subprocess.run(
                dvc_command(e, processes, targets), cwd=repo, env=env, stdout=f, stderr=f
            ).returncode, log

    return run_one


def gpu_groups(specs: Sequence[str] | None) -> list[str]:
    """``--gpus`` values -> CUDA_VISIBLE_DEVICES strings; none: one group, the environment's own devices.

    Raises:
        ParamsError: a malformed group, or a GPU in two groups (two experiments would share it).
    """
    if not specs:
        return [""]
    problems, seen, groups = [], {}, []
    for spec in specs:
        ids = [x.strip() for x in spec.split(",")]
        if not all(x.isdigit() for x in ids):
            problems.append(f"--gpus {spec}: expected GPU indices separated by commas, e.g. --gpus 0,1")
            continue
        for x in ids:
            if x in seen:
                problems.append(
                    f"--gpus {spec}: GPU {x} is also in --gpus {seen[x]}; give each GPU one group"
                )
            seen[x] = spec
        groups.append(",".join(ids))
    if problems:
        raise ParamsError(problems, "the command line")
    return groups


def run_experiments(
    experiments: list[Experiment],
    groups: list[str],
    repo: Path,
    params_file: Path,
    dry_run: bool = False,
    targets: Sequence[str] = (),
) -> int:
    """Validate, then run `experiments` over `groups` through DVC; exit status 1 if any failed."""
    check_experiments(params_file, experiments)
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ParamsError([f"experiment names repeat: {names}; give distinct values"], "the command line")
    if dry_run:
        for i, e in enumerate(experiments):
            group = groups[i % len(groups)]
            processes = len(group.split(",")) if group else None
            prefix = f"CUDA_VISIBLE_DEVICES={group} " if group else ""
            print(prefix + " ".join(dvc_command(e, processes, targets)[2:]))
        return 0
    print(f"[grid] {len(experiments)} experiments on {len(groups)} GPU group(s)", flush=True)
    outcomes = run_grid(experiments, groups, dvc_runner(repo, repo / "logs" / "grid", targets))
    failed = [o for o in outcomes if o.returncode]
    print(
        f"[grid] {len(outcomes) - len(failed)} of {len(outcomes)} done"
        + (f"; failed: {', '.join(o.name for o in failed)}" if failed else "")
        + "; compare them with `python -m posttrain table`, `dvc exp show` or `dvc metrics diff`",
        flush=True,
    )
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m posttrain grid",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "-S",
        "--set-param",
        dest="settings",
        action="append",
        required=True,
        metavar="KEY=V1[,V2...]",
        help="a params key and its values; several -S make every combination",
    )
    ap.add_argument(
        "--gpus",
        action="append",
        metavar="I[,J...]",
        help="a GPU group (repeat for more groups; each experiment runs on one group with launch.processes = "
        "its size); none: one experiment at a time on the environment's devices",
    )
    ap.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="STAGE",
        help="a stage to reproduce, e.g. evaluate_sft@sft1 (repeat); none: the whole pipeline",
    )
    ap.add_argument("--name", default="grid", help="prefix of the experiment names (default grid)")
    ap.add_argument("--params", default="params.yaml", type=Path, help="the params file to validate against")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the commands only")
    args = ap.parse_args(argv)
    grid = parse_settings(args.settings)
    experiments = [Experiment(n, o) for n, o in zip(experiment_names(args.name, grid), grid)]
    groups = gpu_groups(args.gpus)
    return run_experiments(experiments, groups, Path.cwd(), args.params, args.dry_run, args.target)
