"""Pin the hub revisions a params file leaves open: ``python -m posttrain pin SRC [DST]``.

The study preset (`configs/study.yaml`) pins llava-1.5-7b-hf to a commit; a model or dataset revision that
is empty or a branch name ("main") is resolved here to the commit it points at now, through the hub API,
and written back with the file's comments kept. Only the hub sources the params use are resolved: a local
folder or parquet needs no pin. The critic is a local folder written by `convert-critic` (download its source
at a commit), so it is not pinned here. SRC is validated before any hub call and the result before DST is
replaced, in one rename.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.core.errors import InputError

COMMIT = re.compile(r"[0-9a-f]{40}")
PINNED_KEYS = ("base.revision", "prepare.lrv.revision")  # the revisions `hub_sources` can return
HELP = (
    "Pin the hub revisions a params file leaves open (empty or a branch) to the commits they point at now, "
    "keeping the file's comments. SRC is validated first; DST (default: SRC) is replaced only by a valid "
    "file."
)


@dataclass(frozen=True)
class Pin:
    """One hub source of a params file: where its revision lives and what it resolved to."""

    key: str  # dotted path of the revision, e.g. "prepare.lrv.revision"
    repo_id: str
    repo_type: str  # "model" | "dataset"
    revision: str  # as written in the file ("" or a branch or a commit)


def hub_sources(data: dict[str, Any]) -> list[Pin]:
    """The hub sources `data` (a params mapping) uses, with their revisions as written."""
    out = []
    base = data.get("base") or {}
    if base.get("model") == "hub" and not Path(str(base.get("hub_id", ""))).is_dir():
        out.append(Pin("base.revision", base["hub_id"], "model", str(base.get("revision") or "")))
    prepare = data.get("prepare") or {}
    lrv = prepare.get("lrv") or {}
    if prepare.get("source") == "lrv_chart" and not lrv.get("local_parquet"):
        out.append(Pin("prepare.lrv.revision", lrv["hub_id"], "dataset", str(lrv.get("revision") or "")))
    return out


def resolve(pin: Pin, api=None) -> str:
    """The commit SHA `pin.revision` (a branch; empty means "main") points at on the hub."""
    if COMMIT.fullmatch(pin.revision):
        return pin.revision
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    info = api.repo_info(pin.repo_id, repo_type=pin.repo_type, revision=pin.revision or "main")
    return info.sha


def pin_file(src: str | Path, dst: str | Path, api=None) -> list[tuple[Pin, str]]:
    """Write `src` to `dst` with every open hub revision resolved to a commit; return what changed.

    `src` is validated before any hub call (its syntax, duplicate keys and values, all but the revisions
    this fills in) and the result before `dst` is touched; `dst` is replaced in one rename.

    Raises:
        posttrain.core.config.ParamsError: `src`, or the pinned result, is not a valid params file.
    """
    from ruamel.yaml import YAML

    from posttrain.core.config import ParamsError, read_params_file, read_params_text
    from posttrain.core.io import write_text_atomic

    text = read_params_file(src)
    try:
        read_params_text(text, str(src))
    except ParamsError as e:  # the open revisions are what pinning fixes; anything else is reported now
        problems = [p for p in e.problems if not p.startswith(tuple(f"{k}: empty" for k in PINNED_KEYS))]
        if problems:
            raise ParamsError(problems, str(src)) from None
    yaml = YAML()  # round-trip: comments and key order are kept
    yaml.width = 4096
    yaml.preserve_quotes = True
    yaml.representer.add_representer(  # keep `null` written as null, not as an empty value
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    data = yaml.load(text)
    changes = []
    for pin in hub_sources(data):
        sha = resolve(pin, api)
        if sha != pin.revision:
            *parents, leaf = pin.key.split(".")
            node = data
            for k in parents:
                node = node[k]
            node[leaf] = sha
            changes.append((pin, sha))
    out = io.StringIO()
    yaml.dump(data, out)
    read_params_text(out.getvalue(), str(dst))  # the file the stages will read, as they will read it
    write_text_atomic(dst, out.getvalue())
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m posttrain pin SRC [DST]`` (DST defaults to SRC).

    Returns:
        0 when DST is written; 2 when a revision cannot be resolved. A params problem raises `ParamsError`
        (`posttrain.__main__` prints it and exits 1); DST is then left as it was.
    """
    ap = argparse.ArgumentParser(prog="python -m posttrain pin", description=HELP)
    ap.add_argument("src", type=Path, help="params file, e.g. configs/study.yaml")
    ap.add_argument("dst", type=Path, nargs="?", help="where to write it (default: in place)")
    args = ap.parse_args(argv)
    dst = args.dst or args.src
    try:
        changes = pin_file(args.src, dst)
    except InputError:  # a params problem: the caller prints it (posttrain.core.runtime.exit_status)
        raise
    except Exception as e:  # network, missing repo, no access: one line, exit 2
        print(f"error: could not resolve a revision of {args.src}: {e}", file=sys.stderr)
        return 2
    for pin, sha in changes:
        print(f"{pin.key}: {pin.repo_id} {pin.revision or '(empty)'} -> {sha}")
    print(f"pinned {len(changes)} revision(s); wrote {dst}")
    return 0
