"""``lomar predict CKPT IMAGES... --out DIR``: a trained classifier (a finetuned one or a linear probe), detector or
segmenter run on a user's own images (the work: :mod:`lomar.eval.predict`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lomar.checkpoints.kinds import LINPROBE_FORMAT, trained_precision
from lomar.cli.app import command_prefix
from lomar.cli.common import check_checkpoint, check_input, check_output_dir, resolve_device
from lomar.errors import UsageError
from lomar.train import settings as S
from lomar.train.runtime import default_workers, use_threads
from lomar.train.segment_config import SegmentConfig
from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting
from lomar.values import counted

__all__ = ["add_arguments", "run", "SETTINGS"]

_SEGMENT_EVAL_MODE = S.declarations(SegmentConfig)["eval_mode"]  # its default: a segmenter's that saved none

SETTINGS = {
    "checkpoint": Setting(None, "the best.pt or last.pt of a `lomar finetune` (a ViT's or a BEiT's classifier), "
                          "`lomar detect` or `lomar segment` run, or its run folder (its best.pt, else last.pt); or a "
                          "file `lomar linprobe --save` wrote (the probe on its frozen encoder)", kind=str, flag="",
                          metavar="CKPT", path=True),
    "images": Setting(None, "image files and folders (searched recursively, as the training commands search one)",
                      kind=str, flag="", nargs="+", metavar="IMAGES", path=True),
    "out": S.TO.but(metavar="DIR", help="output folder (created if missing)"),
    "top_k": Setting(5, "classifier: the most probable classes written per image", above=0),
    "score_threshold": Setting(0.0, "detector: leave out detections scored below this (default: 0, every detection the "
                               "model returns, as in detect's predictions.json)", low=0, high=1),
    "eval_mode": _SEGMENT_EVAL_MODE.but(
        default=None,
        help="segmenter: slide = windows of the run's --img-size every --eval-stride pixels, whole = the whole image "
             "at once (default: the run's --eval-mode)"),
    "device": S.DEVICE,
    "precision": S.PRECISION.but(
        help="auto = the precision of the run's own evaluation, so that the predictions are its --eval-only's: fp32 "
             "for a detector, segmenter or probe, the precision a finetuned classifier trained in (its checkpoint "
             "records it; else this machine's auto); fp32, bf16 or fp16: autocast to it (bf16: the fast choice where "
             "the hardware multiplies bf16 natively, its answers rounded)"),
    "batch_size": S.BATCH_SIZE.but(default=16, help="images per forward pass (a segmenter's: one, as segment "
                                                    "evaluates)"),
    "workers": S.WORKERS,
    "threads": S.THREADS,
    "overwrite": S.OVERWRITE.but(help="replace the prediction files an earlier lomar predict wrote in DIR, a "
                                      "segmenter's PNGs of images not predicted this time removed (other files there "
                                      "are left alone)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "A classifier writes DIR/predictions.jsonl: one line per image, {\"path\", \"top_k\": [{\"class\", "
        "\"probability\"}, ...]}; a detector DIR/predictions.json: COCO results as detect's own, each with the "
        "image's path as its image_id and its category_name where the run kept names; a segmenter DIR/NAME.png per "
        "image (NAME: its path below the folder given, or a file given's own name, without its suffix): its classes "
        "at the image's size, numbered as the run's annotations (class + 1 under --zero-label ignore). Each image is "
        "read and preprocessed as the command's evaluation (--eval-only) reads a validation image.")
    add_settings(parser, SETTINGS)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")  # the text given: Path("") would be the working folder
    check_checkpoint(args.checkpoint)
    for given in args.images:
        check_input(given, f"{given} does not exist; pass image files or folders of images")
    import torch

    from lomar.eval import predict  # torch: not for --help
    from lomar.train.run_lock import RunLock  # torch: not for --help
    from lomar.train.run_state import clear_killed_writes, inside  # torch: not for --help
    from lomar.train.segment_pngs import WRITTEN  # torch (checkpoints.io): not for --help

    # as a training run's --out inside its --data is refused: a later predict of the folder would read its PNGs
    if folder := next((given for given in args.images if Path(given).is_dir() and inside(Path(args.out), Path(given))),
                      None):
        raise UsageError(f"--out {args.out} is inside {folder}: the predictions would join the images a later lomar "
                         f"predict of {folder} reads; pass an --out outside it")
    device = torch.device(resolve_device(args.device))
    use_threads(args.threads)
    trained = predict.load_trained(args.checkpoint)
    _check_applies(args, trained)
    images = predict.list_images(args.images)
    out = Path(args.out)
    targets = ([out / predict.OUTPUTS[trained.kind]] if trained.kind in predict.OUTPUTS
               else _png_paths(out, images))
    with RunLock(out):  # held while it writes: a temporary of its files there is then a killed predict's
        clear_killed_writes(out, "predict", targets if trained.kind in predict.OUTPUTS else [*targets, out / WRITTEN])
        return _write(args, trained, images, out, targets, device)


def _write(args: argparse.Namespace, trained, images, out: Path, targets: list[Path], device) -> int:
    """Run ``trained`` on ``images`` and write ``targets`` (its prediction files) into ``out``; the exit code."""
    from lomar.checkpoints.io import atomic_write_bytes, atomic_write_text  # torch: not for --help
    from lomar.eval import predict  # torch: not for --help
    from lomar.train.precision import autocast_factory  # torch: not for --help
    from lomar.train.segment_pngs import WRITTEN, begin_label_maps, end_label_maps  # torch: not for --help

    if not args.overwrite and (there := next((path for path in targets if path.exists()), None)):
        raise UsageError(f"{there} already exists; pass --overwrite to replace it, or another --out")
    workers = default_workers() if args.workers is None else args.workers
    skipped: list[str] = []
    me = command_prefix(args)
    precision, notes = _precision(args.precision, trained, device)
    for note in notes:
        print(f"{me}: note: {note}", file=sys.stderr, flush=True)
    autocast = autocast_factory(precision, device)
    if trained.kind == "segmenter":
        mode = args.eval_mode or trained.checkpoint["settings"].get("eval_mode", _SEGMENT_EVAL_MODE.default)
        # listed as lomar's: --overwrite removes an earlier predict's PNGs of images this one does not write
        before, names = begin_label_maps(out, {path.relative_to(out).as_posix() for path in targets}), set()
        for image, png in predict.segment(trained, images, device, mode, workers, skipped, autocast):
            (path := _png_path(out, image)).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, png)
            names.add(path.relative_to(out).as_posix())
        _some_read(images, skipped)
        left = end_label_maps(out, before, names, remove=args.overwrite)
        written = len(names)
        what = f"label maps ({mode}, {trained.checkpoint['settings']['num_classes']} classes, {precision})"
        where = f"{out}" + (f"; {counted(left, 'other PNG')} left there, which lomar cannot tell from yours ({out} "
                            f"held no {WRITTEN} listing the ones it wrote): remove any an earlier predict wrote"
                            if left else "")
    elif trained.kind == "classifier":
        rows = predict.classify(trained, images, device, args.top_k, args.batch_size, workers, skipped, autocast)
        _some_read(images, skipped)
        out.mkdir(parents=True, exist_ok=True)
        where = atomic_write_text(out / predict.OUTPUTS["classifier"],
                                  "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        written = len(rows)
        what = f"top-{min(args.top_k, trained.model.num_classes)} of {trained.model.num_classes} classes, {precision}"
    else:
        results = predict.detect(trained, images, device, args.score_threshold, args.batch_size, workers, skipped,
                                 autocast)
        _some_read(images, skipped)
        out.mkdir(parents=True, exist_ok=True)
        where = atomic_write_text(out / predict.OUTPUTS["detector"], json.dumps(results))
        written = len(images) - len(skipped)
        threshold = f" scored {args.score_threshold:g} or more" if args.score_threshold else ""
        what = f"{counted(len(results), 'detection')}{threshold}, {precision}"
    if skipped:
        print(f"{me}: {counted(len(skipped), 'unreadable image')} skipped (each warned of above), e.g. {skipped[0]}",
              file=sys.stderr)
    print(f"{me}: {counted(written, 'image')} ({trained.kind} {trained.path}), {what} -> {where}")
    return 0


_FOR_KIND = {"top_k": "classifier", "score_threshold": "detector", "eval_mode": "segmenter"}


def _check_applies(args: argparse.Namespace, trained) -> None:
    """UsageError where a setting of another kind of model than ``trained``'s is given other than its default: a
    segmenter's label maps are what they are whatever --score-threshold says, and the user would take them as
    thresholded."""
    for name, kind in _FOR_KIND.items():
        value = getattr(args, name)
        if kind != trained.kind and value is not None and value != SETTINGS[name].default:
            flag = SETTINGS[name].name_flag(name)
            raise UsageError(f"{S.as_typed(flag, value)} is a {kind}'s setting; {trained.path} is a {trained.kind}, "
                             f"whose predictions it would not change: drop {flag}")


def _precision(given: str, trained, device) -> tuple[str, list[str]]:
    """The precision ``trained`` (a :class:`~lomar.eval.predict.Trained`) predicts in on ``device``, and the notes to
    print: ``given`` (--precision); auto is the precision of its run's own evaluation, so that its predictions are
    the ones that run scored: fp32 for a detector and a segmenter (detect and segment evaluate in fp32 whatever they
    trained in); a classifier's, the one its checkpoint records having trained in, as finetune --eval-only keeps it
    (:func:`~lomar.train.precision.trained_precision_kept`: this machine's auto where it records none)."""
    # torch: not for --help
    from lomar.train.precision import emulated_bf16_notes, trained_precision_kept

    if given != "auto":
        return given, emulated_bf16_notes(given, device, _precision("auto", trained, device)[0])
    if trained.kind != "classifier":
        return "fp32", []
    # a `linprobe --save` file's classifier is a frozen encoder under the probe that trained, on fp32 features
    what = "the probe" if trained.checkpoint.get("format") == LINPROBE_FORMAT else f"the {trained.kind}"
    precision, note = trained_precision_kept(given, trained_precision(trained.checkpoint), what, device)
    return precision, [note] if note else []


def _png_path(out: Path, image) -> Path:
    """A segmenter's PNG of ``image`` (a :class:`~lomar.eval.predict.ListedImage`) in ``out``: its name plus .png (a
    name may hold dots, which with_suffix would cut)."""
    return out / f"{image.name}.png"


def _png_paths(out: Path, images) -> list[Path]:
    """A segmenter's PNG of each image in ``out``; UsageError where two images would write one."""
    paths: dict[Path, str] = {}
    for image in images:
        if (first := paths.setdefault(png := _png_path(out, image), image.path)) != image.path:
            raise UsageError(f"{first} and {image.path} would both write {png}; predict them into separate --out "
                             f"folders, or rename one")
    return list(paths)


def _some_read(images, skipped: list[str]) -> None:
    """UsageError where no image could be read (each warned of as it was met): nothing to write."""
    if len(skipped) == len(images):
        raise UsageError(f"no image given could be read ({len(images)} tried; the first: {skipped[0]}); pass images "
                         f"lomar reads (JPEG, PNG, ...)")
