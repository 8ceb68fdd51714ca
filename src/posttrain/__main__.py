"""Command line: ``python -m posttrain <command> ...``.

Commands:
    compare          Compare models' response JSONL files (see `posttrain.report.compare`).
    convert-critic   Convert LLaVA-Critic to transformers' format (see `posttrain.realscale.convert_critic`).
    pin              Pin a params file's hub revisions to commits (see `posttrain.realscale.pin`).
    e2e              The study preset end to end on stand-in hub files (see `posttrain.realscale.e2e`).
    seeds            The study under several seeds, and the table of its conclusions
                     (see `posttrain.experiments.seeds`).
    grid             An ablation grid of DVC experiments, each on its own GPU group
                     (see `posttrain.experiments.grid`).
    table            What DVC experiments changed and what their models learnt per study family
                     (see `posttrain.experiments.table`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from posttrain.core.errors import InputError
from posttrain.core.io import write_text_atomic
from posttrain.core.runtime import exit_status
from posttrain.report.compare import CompareError, check_rows, compare, format_markdown, load_responses

HELP = "Commands of the posttrain project besides its DVC stages (dvc repro runs those)."
COMPARE_EPILOG = """\
Each FILE holds one JSON object per line, one per prompt; rows pair across the files by id.
  required:  id (string or integer), prompt, reference, response (strings)
  optional:  null or absent leaves the row out of that metric, except where noted
    critic_score  number 0-100, a judge's score                -> critic
    short_answer  string, the expected short answer            -> relaxed_acc
    extracted     string, the answer read from the response    -> relaxed_acc (absent: the whole
                  response is compared; null never matches)
    correct       true/false, a verdict used as given          -> relaxed_acc
    negative      true/false, the question names an absent     -> negative_acc (needed on every row)
                  element, so the right answer declines
    declined      true/false, the response declines            -> negative_acc (needed on negative rows)
  Other fields (e.g. image) are ignored: the evaluation's data/eval/<split>/<model>.jsonl fit as they are.
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m posttrain", description=HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("pin", help="resolve a params file's open hub revisions to commits (SRC [DST])")
    sub.add_parser("e2e", help="run every stage of the study preset on stand-ins of the hub files (WORKDIR)")
    sub.add_parser("seeds", help="run the study under other seeds (run --seeds 1 2); their table (table)")
    sub.add_parser(
        "grid", help="an ablation grid of DVC experiments over GPU groups (-S KEY=V1,V2 --gpus 0,1)"
    )
    sub.add_parser(
        "table", help="DVC experiments' changed params and per-family accuracy vs the chance line ([NAME])"
    )
    sub.add_parser(
        "convert-critic", help="convert LLaVA-Critic from LLaVA-NeXT's layout to transformers' (SRC DST)"
    )

    p = sub.add_parser(
        "compare",
        help="compare models' responses (one JSONL per model; the model name is the file stem)",
        description="Metric means with bootstrap CIs per model, and paired-bootstrap deltas vs a baseline.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="response JSONL, one per model")
    p.add_argument("--baseline", required=True, help="stem of the baseline model's file")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the result as JSON here")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=_cmd_compare)
    return parser


def _cmd_compare(args: argparse.Namespace) -> int:
    """Load the files, compare, print markdown, optionally write JSON."""
    if args.resamples < 1:
        raise CompareError(f"--resamples must be at least 1, got {args.resamples}.")
    stems: dict[str, Path] = {}
    for path in args.files:
        if path.stem in stems:
            raise CompareError(f"{stems[path.stem]} and {path} have the same model name {path.stem!r}.")
        stems[path.stem] = path
    if args.baseline not in stems:
        raise CompareError(f"--baseline {args.baseline!r} is not one of the file stems: {', '.join(stems)}.")
    by_path = {str(path): load_responses(path) for path in stems.values()}
    check_rows(by_path)  # same checks compare() makes, but the messages name the files
    models = {stem: by_path[str(path)] for stem, path in stems.items()}
    result = compare(models, args.baseline, n_resamples=args.resamples, seed=args.seed)
    sys.stdout.write(format_markdown(result))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code.

    A bad params or data file (`posttrain.core.errors.InputError`) prints its message alone and gives 1; a
    usage error gives argparse's 2.

    Args:
        argv: Arguments without the program name; None reads `sys.argv`.

    Returns:
        Exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    return exit_status(lambda: _run(argv))


def _run(argv: list[str]) -> int:
    """Dispatch to the command `argv` names."""
    if argv[:1] == ["convert-critic"]:  # its own argparse: LLaVA-NeXT layout -> transformers OneVision
        from posttrain.realscale.convert_critic import main as convert_critic

        return convert_critic(argv[1:])
    if argv[:1] == ["pin"]:  # resolve open hub revisions of a params file (posttrain.realscale.pin)
        from posttrain.realscale.pin import main as pin

        return pin(argv[1:])
    if argv[:1] == ["e2e"]:  # the real-scale path on stand-ins of the hub files (posttrain.realscale.e2e)
        from posttrain.realscale.e2e import main as e2e

        return e2e(argv[1:])
    # dvc experiments per seed and the table of conclusions (posttrain.experiments.seeds)
    if argv[:1] == ["seeds"]:
        from posttrain.experiments.seeds import main as seeds

        return seeds(argv[1:])
    if argv[:1] == ["grid"]:  # dvc experiments over GPU groups (posttrain.experiments.grid)
        from posttrain.experiments.grid import main as grid

        return grid(argv[1:])
    if argv[:1] == ["table"]:  # dvc experiments read back per study family (posttrain.experiments.table)
        from posttrain.experiments.table import main as table

        return table(argv[1:])
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the error already
        return int(e.code or 0)
    try:
        return args.func(args)
    except InputError:  # exit_status prints it
        raise
    except OSError as e:  # e.g. the --json destination is not writable
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
