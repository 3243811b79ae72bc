"""``lomar study``: grids of pretraining cells and their evaluations as one resumable job.

Every cell is an ordinary ``lomar pretrain`` run folder, configured through the commands' own
flag declarations and trained and scored through the library (``runner.py``, ``evals.py``); the
spec (``spec.py``), presets, results and figures complete it.
"""

from __future__ import annotations

import argparse
import sys

from lomar.cli.common import check_output_dir, refuse_torchrun
from lomar.cli.study.presets import PRESETS, SCALES, build_preset, describe
from lomar.cli.study.spec import StudyFailed, StudyStopped, load_spec, parse_budget, seed_list
from lomar.errors import UsageError
from lomar.values import command_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Re-run the same command to continue a stopped study: finished cells and evaluations "
                     f"are skipped. Presets: {', '.join(PRESETS)} (see lomar.cli.study.presets).")
    parser.add_argument("spec", nargs="?", metavar="SPEC.yaml",
                        help="the study's spec (see lomar.cli.study.spec); its relative data: and out: paths are "
                             "read from its folder")
    parser.add_argument("--preset", help=f"a preset instead of a spec: {', '.join(PRESETS)} (default: none)")
    parser.add_argument("--data", help="for a preset: image folder; with train/ and val/ class folders "
                                       "the accuracies are measured too (default: the demo photos)")
    parser.add_argument("--budget", help="pretraining per cell, e.g. 30s, 2min, 200steps, 3epochs "
                                         "(default: the spec's or preset's)")
    parser.add_argument("--seeds", type=int, help="number of seeds (0, 1, ..., N-1), at most 100 "
                                                   "(default: the spec's or preset's)")
    parser.add_argument("--out", help="study folder (default: the spec's out:, else studies/NAME, NAME the spec's "
                                      "name or the preset)")
    parser.add_argument("--scale", choices=SCALES, default="small",
                        help="for a preset of the paper's experiments: small = a small ViT on a CPU in minutes; "
                             "paper = the paper's ViT-B/16 settings (a GPU): printed, and run when --data is given "
                             "(default: small)")


def run(args: argparse.Namespace) -> int:
    refuse_torchrun("each would run the whole study")  # its cells train one at a time, each in this process
    if bool(args.spec) == bool(args.preset):
        raise UsageError("pass either SPEC.yaml or --preset NAME (one of them)")
    if args.seeds is not None and args.seeds <= 0:
        raise UsageError(f"--seeds must be a positive count, got {args.seeds}")
    seeds = None if args.seeds is None else seed_list(args.seeds, "--seeds")
    budget = None if args.budget is None else parse_budget(args.budget, "--budget")
    if args.scale != "small" and not args.preset:
        raise UsageError("--scale is for presets; a spec states its own settings")
    if args.out is not None:  # before a preset composes its data there; an empty one (an unset variable) too
        check_output_dir(args.out, "--out")
    if args.preset:
        out = args.out or f"studies/{args.preset}"
        spec = build_preset(args.preset, args.data, args.budget, args.seeds, out, scale=args.scale)
        if args.scale == "paper":
            print(describe(spec), end="", flush=True)
            if args.data is None:
                print("lomar study: --scale paper prints the settings only; pass --data ROOT (your images, with "
                      "train/ and val/ for accuracy) on a GPU to run them", file=sys.stderr)
                return 0
    else:
        if args.data:
            raise UsageError("--data is for presets; a spec names its data under data:")
        spec = load_spec(args.spec)
        spec.budget, spec.seeds = budget or spec.budget, seeds or spec.seeds
        spec.check_size()
        spec.check_every(f"--budget {args.budget}" if budget else None)  # an at-Nsteps point in a seconds budget
        out = args.out or spec.out or f"studies/{spec.name}"
    check_output_dir(out, "out:" if spec.out and not args.out else "--out")  # as the user gave it
    from lomar.cli.study.runner import run_study  # torch: not for --help; after the checks, which need none

    print(f"lomar study: {spec.name}, {len(spec.cells())} cell(s), {spec.budget} each, into {out}", flush=True)
    try:
        run_study(spec, out, command=command_line("lomar", "study", *sys.argv[2:]))
    except StudyStopped as exc:
        print(f"lomar study: stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except StudyFailed as exc:  # the work failed (exit 1), as the cell's own command would say
        print(f"lomar study: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0
