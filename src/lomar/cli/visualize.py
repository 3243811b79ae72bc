"""``lomar visualize CKPT IMAGES…``: reconstruction and attention figures of a pretrained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from lomar.checkpoints.kinds import run_command
from lomar.checkpoints.run_folder import run_checkpoint
from lomar.cli.app import command_prefix
from lomar.cli.common import add_override_arguments, check_checkpoint, check_output_dir, load_for_cli
from lomar.cli.export import CHECKPOINT
from lomar.data.demo_images import demo_image_paths
from lomar.data.pathtable import dangling_link
from lomar.errors import UsageError
from lomar.train import settings as S
from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting
from lomar.values import as_sides, counted

__all__ = ["add_arguments", "run", "prepare_image", "MAX_IMAGES"]

MAX_IMAGES = 64  # one figure row each: more would make a PNG no screen shows


def prepare_image(path: str | Path, size: int | tuple[int, int]):
    """Image file -> (3, height, width) float tensor (``size``: a side or the pair), ImageNet-normalised: resized
    (bicubic) to cover the size, centre crop (of a strip's central 16:1 part:
    :func:`lomar.data.classify.bound_aspect`)."""
    from torchvision.transforms.v2 import functional as TF

    from lomar.data.classify import bound_aspect  # torch: not for --help
    from lomar.data.decode import load_image  # torch: not for --help
    from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # torch: not for --help

    image = bound_aspect(load_image(path))  # a strip resized whole would be gigabytes
    (height, width), (h, w) = as_sides(size), image.shape[-2:]
    # the side that limits takes its size, the other its share (truncated, as torchvision's shorter-side resize does)
    if height * w >= width * h:
        shape = [height, max(width, int(height * w / h))]
    else:
        shape = [max(height, int(width * h / w)), width]
    image = TF.resize(image, shape, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.center_crop(image, [height, width]).float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes OUT/reconstruction.png (one row per image: original | sampled windows (none for "
                     "MAE's whole-image mask) | masked input | reconstruction; for a BEiT pretraining checkpoint "
                     "OUT/tokens.png: image | its tokenizer's tokens | the predicted ones | correct or wrong) and, "
                     "with --attention, OUT/attention-NN-NAME.png per image. "
                     "CKPT: our pretraining checkpoint (or its run folder: its best.pt, else last.pt), one from "
                     "`lomar load-original`, or an original one (an encoder-only checkpoint or export folder gives "
                     "attention figures only).")
    add_settings(parser, {
        "checkpoint": CHECKPOINT,
        "images": Setting(None, f"image files and folders (searched as lomar predict searches one), at most "
                          f"{MAX_IMAGES} images (default: four photographs bundled with scikit-image)", kind=str,
                          flag="", nargs="*", metavar="IMAGE", path=True),
        "seed": S.SEED.but(help="seed of the sampled windows and masks"),
        "out": S.TO.but(default="figures", required=False, metavar="DIR", help="output folder"),
        "attention": Setting(False, "also draw, per image, the attention each block pays inside the target's window"),
        "target_patch": Setting(None, "target patch in the image's patch grid (default: the centre)", kind=int, low=0,
                                nargs=2, metavar=("ROW", "COL")),
        "context": Setting(None, "attention with cls + window tokens only or the whole image (default: window for "
                           "LoMaR, image for MAE and encoders)", kind=str, choices=("window", "image")),
        "masked": Setting(False, "attention with the window masked as in pretraining (target masked; LoMaR)"),
        "attention_window": Setting(None, "attention window size K in patches (default: a LoMaR checkpoint's own "
                                    "window size; otherwise 7, or the patch grid's side if smaller)", kind=int,
                                    above=0, metavar="K"),
    })
    add_override_arguments(parser)


def run(args: argparse.Namespace) -> int:
    for image in map(Path, args.images):
        if not image.is_file() and not image.is_dir():
            raise UsageError(f"image {image} {_not_a_file(image)}; pass image files (PNG, JPEG, …) or folders")
    check_output_dir(args.out, "--out")
    given = [flag for flag, value in (("--target-patch", args.target_patch), ("--context", args.context),
                                      ("--masked", args.masked), ("--attention-window", args.attention_window))
             if value]
    if given and not args.attention:  # they shape the attention figures only: without them, nothing would use them
        raise UsageError(f"{given[0]} is for the attention figures; add --attention, or drop {given[0]}")
    check_checkpoint(args.checkpoint)
    from lomar.checkpoints.formats_dense import DENSE_ARCH, whole_model_refusal  # torch: not for --help
    from lomar.data.transforms import denormalize  # torch: not for --help
    from lomar.models.beit import BEiT  # torch: not for --help
    from lomar.models.lomar import LoMaR  # torch: not for --help
    from lomar.models.mae import MAE  # torch: not for --help
    from lomar.models.vit import VisionTransformer  # torch: not for --help
    from lomar.viz.attention import (  # torch: not for --help
        attention_figure,
        attention_request,
        window_attention,
        windowed_blocks,
    )
    from lomar.viz.reconstruction import reconstruction_figure  # torch: not for --help
    from lomar.viz.tokens import token_figure  # torch: not for --help

    paths, found = _image_paths(args.images)  # a folder without images: before the model loads
    paths = paths or demo_image_paths()[:4]
    if Path(args.checkpoint).is_dir() and (kept := run_checkpoint(Path(args.checkpoint))) is not None:
        # A run folder: the checkpoint every reader reads of one without an export (best.pt, else last.pt), and a
        # finished pretraining run's last.pt, which has the pixel head its export (encoder.safetensors) has not:
        # read, the export would refuse a reconstruction asked of the run that made it.
        args.checkpoint = str(kept)
    meta = _meta(Path(args.checkpoint))
    if run_command(meta) in DENSE_ARCH:  # load_model's detector or segmenter: no figure here draws one
        raise UsageError(str(whole_model_refusal(args.checkpoint, meta)))
    model = load_for_cli(args.checkpoint, args)
    model.eval()
    encoder = getattr(model, "encoder", model)
    if not isinstance(model, BEiT) and not isinstance(encoder, VisionTransformer):  # a finetuned BEiT: timm's Beit
        raise UsageError(f"{args.checkpoint} holds timm's Beit (a finetuned BEiT classifier, or a probe on one), whose "
                         f"attention no figure here reads; pass the BEiT pretraining checkpoint it started from")
    can_reconstruct = isinstance(model, (LoMaR, MAE))
    token_model = _token_model(model, Path(args.checkpoint), meta) if isinstance(model, BEiT) else None
    if not can_reconstruct and token_model is None and not args.attention:
        what = ("a BEiT without its pretraining run's tokenizer: it predicts visual tokens, not pixels, so it "
                "cannot reconstruct" if isinstance(model, BEiT)
                else "an encoder without a pixel head: it cannot reconstruct")
        raise UsageError(f"{args.checkpoint} holds {what}; pass --attention for attention figures"
                         + ("" if isinstance(model, BEiT) else ", or a pretraining checkpoint"))
    at_step = f" at step {meta['step']}" if isinstance(meta.get("step"), int) else ""  # a training checkpoint's
    out, written = Path(args.out), []
    name = type(model).__name__ if can_reconstruct or isinstance(model, BEiT) else "encoder"
    target = tuple(args.target_patch) if args.target_patch else None
    k, grid = args.attention_window, encoder.grid
    if args.attention and k is not None and k > min(grid):  # the library's message names window_size=, not the flag
        raise UsageError(f"--attention-window {k}: a {k}x{k} window does not fit the {grid[0]}x{grid[1]} patch grid "
                         f"of {args.checkpoint}; pass --attention-window {min(grid)} or less")
    if args.attention and (windowed := windowed_blocks(encoder, grid)):  # the library's names window_size=0
        raise UsageError(f"--attention: {args.checkpoint} has block{'s' * (len(windowed) > 1)} "
                         f"{', '.join(map(str, windowed))} attending inside "
                         f"{encoder.config.window_size}x{encoder.config.window_size} windows (a finetune's "
                         f"--window-size), whose attention maps are not drawn; pass the checkpoint it was finetuned "
                         f"from")
    if args.attention and target is not None and not (target[0] < grid[0] and target[1] < grid[1]):
        raise UsageError(f"--target-patch {target[0]} {target[1]} is outside the {grid[0]}x{grid[1]} patch grid of "
                         f"{args.checkpoint}; pass a row below {grid[0]} and a column below {grid[1]}")
    if args.masked and not (isinstance(model, LoMaR) and args.context in (None, "window")):
        fix = "drop --context image" if isinstance(model, LoMaR) else \
            f"{args.checkpoint} holds a {type(model).__name__}: drop --masked"
        raise UsageError(f"--masked masks the window with LoMaR's mask token, in window context; {fix}")
    try:  # unreadable images, windows or a target that do not fit
        if args.attention:  # checked before any figure is written
            attention_request(model, grid, target, k, args.context, args.masked)
        paths, images = _readable(paths, found, encoder.config.img_size)
        if can_reconstruct:
            title = f"{name} reconstruction of {Path(args.checkpoint).name}{at_step}, seed {args.seed}"
            written.append(reconstruction_figure(model, images, path=out / "reconstruction.png", seed=args.seed,
                                                 title=title))
        if token_model is not None:
            title = f"BEiT token prediction of {Path(args.checkpoint).name}{at_step}, seed {args.seed}"
            written.append(token_figure(token_model, images, out / "tokens.png", seed=args.seed, title=title))
        if args.attention:
            pixels = denormalize(images)
            for i, (path, image) in enumerate(zip(paths, images)):
                result = window_attention(model, image, target=target, window_size=k,
                                          context=args.context, masked=args.masked, seed=args.seed)
                title = f"{name} {Path(args.checkpoint).name}{at_step}: {path.name}"
                written.append(attention_figure(result, pixels[i], encoder.config.patch_size,
                                                out / f"attention-{i:02d}-{path.stem}.png", title=title))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for path in written:
        print(f"{command_prefix(args)}: wrote {path}")
    return 0


def _image_paths(given: list[str]) -> tuple[list[Path], set[Path]]:
    """(the images to draw, one figure row each: the files given, and each folder's images as ``lomar predict`` lists
    them (recursively, sorted, a file given twice drawn once); those of them found in a folder). UsageError past
    MAX_IMAGES distinct files, found without listing a huge folder whole, or for a folder without an image."""
    from lomar.eval.predict import list_images  # torch: not for --help

    paths = [Path(image.path) for image in list_images(given, limit=MAX_IMAGES)]
    if len(paths) > MAX_IMAGES:
        if any(Path(g).is_dir() for g in given):
            where, fix = "in the files and folders given", "pass fewer, or a folder with fewer images"
        else:
            where, fix = "given", "pass fewer"
        raise UsageError(f"more than {MAX_IMAGES} distinct images {where}; {fix} (at most {MAX_IMAGES}: one figure "
                         f"row each)")
    named = {Path(g) for g in given if not Path(g).is_dir()}
    return paths, {path for path in paths if path not in named}


def _readable(paths: list[Path], found: set[Path], size: int | tuple[int, int]):
    """(the paths drawn, their :func:`prepare_image` inputs (N, 3, H, W)). An image found in a folder that cannot be
    read is skipped with a warning, as ``lomar predict`` skips one: a folder of photos is drawn without its one damaged
    file. A file named that cannot be read is a ValueError naming it, as is a folder none of whose images can be."""
    import torch  # not for --help

    from lomar.data.collate import Skipped  # torch: not for --help

    kept, images, warned = [], [], set()
    for index, path in enumerate(paths):
        try:
            images.append(prepare_image(path, size))
        except (ValueError, RuntimeError, OSError) as exc:  # what predict's reader skips
            if path not in found:
                raise
            Skipped.warned(exc, index, warned)
            continue
        kept.append(path)
    if not images:
        raise ValueError(f"none of the images found in the folders given can be read ({counted(len(paths), 'image')} "
                         f"skipped above); fix or remove them, or pass other images")
    return kept, torch.stack(images)


def _not_a_file(path: Path) -> str:
    """Why ``path`` is no image file, in :func:`lomar.data.decode.read_image_bytes`' words for a data set's (whose
    module imports torch: not before this check)."""
    if path.exists():
        return "is not a file"  # a folder, a device
    return f"is {link}" if (link := dangling_link(path)) else "does not exist"


def _meta(checkpoint: Path) -> dict:
    """What the checkpoint file records beside its weights (its step, its run's settings); {} for a folder (an
    export) or a file with none readable (load_model, which reads it next, says what is wrong, or reads a model with no
    step or tokenizer to tell)."""
    from lomar.train.run_state import read_meta  # torch: not for --help

    try:
        return read_meta(checkpoint) if checkpoint.is_file() else {}
    except (OSError, ValueError):
        return {}


def _token_model(model, checkpoint: Path, meta: dict):
    """The BEiT of a `lomar pretrain --method beit` checkpoint (``meta``: its :func:`_meta`) with its run's tokenizer
    (found as a resume finds it) and masking, for the token figure; None where the file records no tokenizer (an
    export, an original)."""
    from types import SimpleNamespace

    from lomar.methods.beit import (  # torch: not for --help
        kept_digest,
        not_trained_with,
        resume_settings,
        tokenizer_for,
    )
    from lomar.models.beit_pretrain import BEiTPretrain  # torch: not for --help

    saved = meta.get("config")
    if not isinstance(saved, dict) or saved.get("method") != "beit" or not saved.get("tokenizer"):
        return None
    saved = dict(saved)
    resume_settings(saved, str(checkpoint), None, {})
    try:
        tokenizer = tokenizer_for(SimpleNamespace(tokenizer=saved["tokenizer"]), model.config.grid)
    except ValueError as exc:
        raise UsageError(f"{checkpoint}: the tokenizer its run trained with cannot be read ({exc}); put it back, or "
                         f"pass --attention for attention figures only") from None
    # A moved run folder without its tokenizer reads the recorded path, which another run may have refilled since
    if (kept := kept_digest(meta)) is not None and (refusal := not_trained_with(
            f"the tokenizer {saved['tokenizer']}", tokenizer.digest(), kept, f"the run of {checkpoint}",
            "the figure would score other tokens; restore the run's tokenizer there, or pass --attention for "
            "attention figures only")):
        raise UsageError(refusal)
    pretrain = BEiTPretrain(model.config, tokenizer, saved["window_size"], saved["windows"], saved["mask_ratio"])
    pretrain.beit = model
    return pretrain.eval()
