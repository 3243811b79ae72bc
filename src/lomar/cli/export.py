"""``lomar export CKPT --to DIR``: the encoder of any checkpoint -> model.safetensors + config.json; ``lomar
load-original PATH --to CKPT``: an original LoMaR / MAE checkpoint -> our pretraining checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from lomar.checkpoints.file_names import CONFIG_NAME, ENCODER_WEIGHTS
from lomar.cli.app import command_prefix
from lomar.cli.common import add_override_arguments, check_checkpoint, check_output_dir, check_output_file, load_for_cli
from lomar.errors import UsageError
from lomar.train import settings as S
from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting
from lomar.values import command_line, counted

__all__ = ["add_arguments", "run", "load_original_add_arguments", "load_original_run", "CHECKPOINT"]

CHECKPOINT = Setting(None, "checkpoint file, exported folder or run folder", kind=str, flag="", metavar="CKPT",
                     path=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("CKPT: our pretraining checkpoint (last.pt), a finetuned classifier checkpoint, a "
                     "checkpoint from `lomar load-original`, or an original LoMaR / MAE checkpoint (a BEiT one is "
                     "exported in timm's Beit layout), or a sharded --fsdp checkpoint-N.dcp folder; a run folder "
                     "without an export is read as its best.pt, else last.pt, else the checkpoint-N.dcp its "
                     "last.json names, as every reader reads one. Load the "
                     "result with lomar.create_encoder(DIR), or in timm after `import lomar.timm_models`: "
                     "timm.create_model('local-dir:DIR', pretrained=True).")
    add_settings(parser, {
        "checkpoint": CHECKPOINT,
        "to": S.TO.but(metavar="DIR", help="output folder (created if missing)"),
        "drop_head": Setting(False, "export a classifier's encoder without its head"),
        "overwrite": S.OVERWRITE.but(help="replace an existing model.safetensors / config.json in DIR"),
    })
    add_override_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.to, "--to")  # the text given: Path("") would be the working folder
    out = Path(args.to)
    _refuse_existing(out, (ENCODER_WEIGHTS, CONFIG_NAME), args.overwrite)  # before loading: at once
    check_checkpoint(args.checkpoint)
    from lomar.checkpoints.convert import encoder_of, export_model, method_metadata  # torch: not for --help
    from lomar.checkpoints.export import export_encoder  # torch: not for --help
    from lomar.checkpoints.export_leftovers import export_lock  # torch: not for --help
    from lomar.models.beit import BEiT  # torch: not for --help
    from lomar.models.vit import VisionTransformer  # torch: not for --help

    model, method = load_for_cli(args.checkpoint, args, loader=export_model)
    if isinstance(model, BEiT):  # timm's Beit layout: per-block relative position bias, no lm_head
        from lomar.checkpoints.export_beit import export_beit_encoder  # torch: not for --help

        write = lambda: export_beit_encoder(model, out, weights_name=ENCODER_WEIGHTS,
                                            metadata={"source": str(args.checkpoint)})
        c, what = model.config, f"BEiT encoder of {args.checkpoint}"
        load = (f"lomar.checkpoints.export_beit.create_timm_beit('{out}') (a timm Beit), or pass {out} to "
                f"lomar finetune / linprobe / knn")
    else:
        encoder = encoder_of(model)
        # named before --drop-head replaces the classifier, which then read as a "visiontransformer"
        meta = method_metadata(model, method or ("classifier" if encoder.num_classes else "encoder"))
        head = f", head of {encoder.num_classes} classes" if encoder.num_classes else ""
        head = f", {meta['windows']} windows{head}" if "windows" in meta else head
        if args.drop_head and encoder.num_classes:
            plain = VisionTransformer(encoder.config)
            missing, _ = plain.load_state_dict(encoder.state_dict(), strict=False)
            # an averaging classifier pooled into fc_norm and has no final norm: the encoder's starts as identity
            head = ", head dropped" + (", final norm new (identity)" if missing else "")
            encoder = plain
        names = _label_names(args.checkpoint, encoder.num_classes) if encoder.num_classes else {}
        write = lambda: export_encoder(encoder, out, metadata={"source": str(args.checkpoint), **meta, **names},
                                       overwrite=args.overwrite)
        c = encoder.config
        what = f"encoder of {args.checkpoint} ({meta['method']}{head})"
        # Python to copy: each path as a literal that reads back as it is (a quote in it escaped)
        load = (f"lomar.create_encoder({str(out)!r}) or, after `import lomar.timm_models`, "
                f"timm.create_model({f'local-dir:{out}'!r}, pretrained=True)")
    # checked again under the folder's lock, held through the write: an export into it that ended while this one
    # loaded is refused as if this one had started after it
    with export_lock(out):
        _refuse_existing(out, (ENCODER_WEIGHTS, CONFIG_NAME), args.overwrite)
        write()
    me = command_prefix(args)
    print(f"{me}: exported the {c.embed_dim}-wide, {c.depth}-block {what} -> {out / ENCODER_WEIGHTS}, "
          f"{out / CONFIG_NAME}")
    print(f"{me}: load with {load}")
    return 0


def _label_names(path: str, rows: int) -> dict:
    """config.json's ``label_names`` (timm's key) for a classifier's head of ``rows`` rows: the class names its
    checkpoint (a `lomar finetune` one) or export saved, so that a reader keeps the head only for the same classes;
    {} where it saved none. UsageError where they cannot name the rows."""
    from lomar.checkpoints.formats import read_mapped, saved_class_names  # torch: not for --help
    from lomar.data.class_names import names_problem  # numpy: not for --help

    _, src = read_mapped(path)  # the weights mapped, not read again
    names = saved_class_names(src)
    if names is None:
        return {}
    if problem := names_problem(names, rows):
        raise UsageError(f"{path}: its classes {problem}; export it with --drop-head, or fix its classes")
    return {"label_names": list(names)}


def _refuse_existing(out: Path, names: tuple[str, ...], overwrite: bool) -> None:
    for name in names:
        if (out / name).exists() and not overwrite:
            raise UsageError(f"{out / name} already exists; pass --overwrite to replace it, or another --to")


def load_original_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("The output is our pretraining checkpoint ({model, config}), or of a finetuned classifier or a "
                     "ViT's weights without a head our classifier / encoder checkpoint: use it with `lomar export`, "
                     "`lomar visualize` (an encoder's attention with --attention) or as `--pretrained` for "
                     "finetuning, knn and linprobe. It holds no optimizer state, so it is not a checkpoint to "
                     "--resume pretraining from.")
    add_settings(parser, {
        "path": Setting(None, "original LoMaR / MAE checkpoint (.pth), or a ViT's weights without a head (timm's "
                              "num_classes=0: an encoder checkpoint)", kind=str, flag="", metavar="PATH", path=True),
        "to": S.TO.but(metavar="CKPT", help="where to write our checkpoint (.pt)"),
        "overwrite": S.OVERWRITE.but(help="replace CKPT if it exists"),
    })
    add_override_arguments(parser)


def load_original_run(args: argparse.Namespace) -> int:
    check_output_file(args.to, "--to", overwrite=args.overwrite)
    if not Path(args.path).is_file():  # before torch's seconds
        raise UsageError(f"{args.path} is not a file; pass an original LoMaR / MAE checkpoint (.pth)")
    from lomar.checkpoints.convert import encoder_of, pretrain_checkpoint  # torch: not for --help
    from lomar.checkpoints.io import atomic_save  # torch: not for --help

    out = Path(args.to)
    # before the load: an export's weights file has the keys of a ViT's weights without a head, which convert
    _refuse_our_own(args.path)
    model = load_for_cli(args.path, args, original=True)
    ckpt = pretrain_checkpoint(model, source=str(args.path))
    atomic_save(ckpt, out)
    vit = encoder_of(model).config
    params = sum(p.numel() for p in model.parameters())
    kind = ckpt["config"]["method"] if "config" in ckpt else "classifier" if ckpt["num_classes"] else "encoder"
    me = command_prefix(args)
    print(f"{me}: converted {args.path} ({kind}, {vit.embed_dim} wide, {counted(vit.depth, 'block')}, "
          f"{counted(vit.num_heads, 'head')}, patch {vit.patch_size}, {params / 1e6:.2f} M parameters) -> {out}")
    # a classifier or an encoder has no pixel head to reconstruct with: its figures are attention maps
    uses = [("export", out, "--to", "DIR"), *((("visualize", out, "IMAGE..."),) if "config" in ckpt else (
        ("knn", out, "--data", "ROOT"), ("visualize", out, "--attention", "IMAGE...")))]
    print(f"{me}: next: " + "   |   ".join(command_line("lomar", *use) for use in uses))
    return 0


def _refuse_our_own(path: str) -> None:
    """UsageError where ``path`` is lomar's own (a pretraining, finetune or classifier checkpoint, an export or its
    weights file beside its config.json), which needs no conversion: the library's words for it name Python calls,
    or would convert an export's weights as a ViT's without a head (the same keys) and lose what config.json says."""
    from lomar.checkpoints.formats import read_mapped  # torch: not for --help

    try:
        reader, src = read_mapped(path)
    except (OSError, ValueError, RuntimeError):  # unreadable here too: the load's own message says why
        return
    kind = src.data.get("format") if reader.name == "lomar-vit" else reader.name  # a classifier says which it is
    if str(kind).startswith(("lomar-pretrain", "lomar-finetune", "lomar-classifier", "export")):
        raise UsageError(f"{path} is lomar's own ({kind} format), not an original LoMaR / MAE checkpoint: it "
                         f"needs no conversion; pass it as it is to lomar export, knn, linprobe or finetune "
                         f"--pretrained")
