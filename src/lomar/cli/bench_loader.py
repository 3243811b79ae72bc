"""``lomar bench --task loader``: images/s per loader worker next to the model's step rate.

``lomar.cli.bench`` dispatches here for ``--task loader``; ``--make-test-set KIND`` writes a
realistic JPEG test set from the demo photographs first (into ``--data``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lomar.cli.common import check_output_file, resolve_device, write_json
from lomar.errors import UsageError
from lomar.train import settings as S
from lomar.train.settings import Setting, add_settings

__all__ = ["add_loader_arguments", "run_loader"]


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the loader task that ``lomar bench`` lacks (it already has --sizes, --model,
    --batch-size, --precision, --compile, --device, --steps, --warmup, --json, --quiet)."""
    add_settings(parser, {
        "data": S.DATA.but(help="folder (or .txt list) of images to load (default: none; --task loader needs it)"),
        "workers": S.WORKERS.but(default=1, help="loader worker processes (0: main process)"),
        "images": Setting(64, "images loaded per measurement", above=0),
        "decode": S.DECODE.but(default=["full"], nargs="+", help="full: reference path; draft: reduced-size JPEG "
                               "decoding; windows: draft + only the plan's windows resampled (LoMaR); gpu is not a "
                               "loader path"),
        "loader_method": Setting("lomar", "whose masking plan the workers draw", choices=("lomar", "mae")),
        "loader_windows": Setting(4, "LoMaR windows per image", above=0),
        "make_test_set": Setting(None, "first write --test-set-count JPEGs of this kind into --data (default: none)",
                                 kind=str, choices=("camera", "imagenet")),
        "test_set_count": Setting(32, "JPEGs in a made test set", above=0),
        "repeats": Setting(1, "loader measurements per setting (median)", above=0),
        "no_model": Setting(False, "measure the loader only"),
    }, group="--task loader")


def run_loader(args: argparse.Namespace) -> int:
    if args.data is None:
        raise UsageError("--task loader needs --data DIR (a folder of images; add --make-test-set camera to "
                         "create one)")
    if "gpu" in args.decode:
        raise UsageError("--decode gpu decodes in the training loop, not in loader workers; use full, draft or windows")
    args.data = Path(args.data)
    check_output_file(args.json, "--json", create_parents=True)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    from lomar.bench.loader import make_test_set, measure_loader, share_model_rate  # torch: not for --help

    if args.make_test_set:
        try:
            make_test_set(args.data, args.make_test_set, args.test_set_count)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        say(f"test set: {args.test_set_count} {args.make_test_set} JPEGs in {args.data}")
    if not args.data.exists():
        raise UsageError(f"--data {args.data} does not exist; pass a folder of images or add --make-test-set")
    import torch

    from lomar.train.run_state import resolve_precision  # torch: not for --help

    device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, torch.device(device))
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    for decode in args.decode:
        try:
            records += measure_loader(
                args.data, list(dict.fromkeys(args.sizes)), args.workers, args.loader_method,
                args.loader_windows, decode, args.images, args.batch_size, args.model, device=device,
                precision=args.precision, compile=args.compile, steps=args.steps, warmup=args.warmup,
                model_rate=not args.no_model and not records, tiny=getattr(args, "tiny", False),
                repeats=args.repeats, progress=say)
        except ValueError as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
    share_model_rate(records)
    out = sys.stdout
    out.write(f"{'px':>5} {'decode':>7} {'img/s/worker':>13} {'CPU ms/img':>11} {'loader img/s':>13} "
              f"{'model img/s':>12}  limited by\n")
    for r in records:
        model = "-" if r["model_images_per_s"] is None else f"{r['model_images_per_s']:.1f}"
        out.write(f"{r['img_size']:>5} {r['decode']:>7} {r['images_per_s']:>13.1f} {r['cpu_ms_per_image']:>11.1f} "
                  f"{r['loader_images_per_s']:>13.1f} "
                  f"{model:>12}  {r['limited_by'] or '-'}\n")
    if args.json:
        meta = dict(command="lomar " + " ".join(sys.argv[1:]), torch=torch.__version__,
                    threads=torch.get_num_threads())
        write_json(args.json, dict(meta=meta, records=records))
        say(f"wrote {args.json}")
    return 0
