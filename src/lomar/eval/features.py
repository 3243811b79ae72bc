"""Frozen-encoder features: loading a pretrained encoder, the evaluation transform, the loaders.

Everything here works on plain ``(images, labels)`` loaders, so the pretraining engine can
score k-NN every few epochs (``--knn-every``) with :func:`knn_loaders`. Checkpoints of every
format are read through :mod:`lomar.checkpoints.formats`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader

from lomar.checkpoints.export_leftovers import readable_file
from lomar.checkpoints.formats import read, saved_class_names
from lomar.checkpoints.formats_beit import BEiTReader
from lomar.checkpoints.io import check_finite
from lomar.checkpoints.keys import CLASSIFIER_PREFIXES, drop_final_norm
from lomar.checkpoints.kinds import classifier_pool, run_command
from lomar.data.class_names import classes_only_in, names_problem, rows_by_name, unicode_forms_note
from lomar.data.classify import bound_aspect, eval_resize
from lomar.data.collate import UNREADABLE_LIMIT, BadDataTracker, collate_labelled
from lomar.data.decode import load_image, load_image_reduced
from lomar.data.folder import LabelledImageFolder
from lomar.data.small_images import SmallImages
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lomar.errors import UsageError, in_flags, said_by_first_on_machine
from lomar.models.attention import vitdet_global_blocks
from lomar.models.beit import timm_global_pool
from lomar.models.masking import grid_size
from lomar.models.modes import eval_mode
from lomar.models.probe_classifier import pooled_features
from lomar.models.relpos import REL_POS_PARAMS
from lomar.models.vit import VisionTransformer, ViTConfig
from lomar.progress_bar import progress
from lomar.values import brief, is_integer, listed

__all__ = ["LoadReport", "load_pretrained_encoder", "eval_transform", "knn_loaders", "eval_load", "extract_features",
           "read_features", "check_read", "skipped_note", "check_split", "Pool"]

Pool = Literal["mean", "cls"]
# torch's two UserWarnings from timm's relative-position resampling (timm 1.0, torch 2.x): the start of each message
_TIMM_RESAMPLE_NOTES = (r"torch\.searchsorted\(\): input value tensor is non-contiguous",
                        r"Using a non-tuple sequence for multidimensional indexing is deprecated")


@dataclass
class LoadReport:
    """What :func:`load_pretrained_encoder` took, left out and initialised afresh."""

    source: str  # "pretrain checkpoint (lomar)", "exported folder", "original checkpoint (mae)", ...
    path: str
    loaded: int = 0  # tensors copied into the encoder
    fresh: list[str] = field(default_factory=list)  # encoder keys not in the source (new head)
    dropped: list[str] = field(default_factory=list)  # source keys the encoder does not use
    notes: list[str] = field(default_factory=list)  # e.g. interpolated position table

    def summary(self, flags: dict[str, str] | None = None) -> str:
        """One line; its notes, which name the Python parameters, in a command's ``flags`` (:func:`in_flags`)."""
        # a classifier's new head.weight and the pretraining head's unused one share a name
        dropped = [f"the source's {key}" if key in self.fresh else key for key in self.dropped]
        text = (f"loaded {self.loaded} tensors from {self.source} {self.path}; "
                f"newly initialised: {listed(self.fresh, 6) or 'none'}; not used: {listed(dropped, 6) or 'none'}")
        return text + "".join(f"; {in_flags(note, flags or {})}" for note in self.notes)


def load_pretrained_encoder(path: str | Path, num_classes: int = 0, global_pool: str = "avg",
                            classes: list[str] | None = None, **overrides) -> VisionTransformer:
    """An encoder, optionally with a new classifier head, from anything pretrained.

    ``path``: our ``lomar pretrain`` checkpoint (``last.pt``: ``model`` + ``config``; its
    ``encoder.*`` keys), a ``lomar finetune`` checkpoint, a folder written by ``lomar export``
    (or a pretraining run folder, which holds ``config.json`` + ``encoder.safetensors``), a run folder without
    an export (finetune's, a stopped pretraining's: its ``best.pt``, else ``last.pt``, as ``lomar predict`` reads one),
    or an original LoMaR / MAE checkpoint. A BEiT source (``lomar pretrain --method beit``,
    its export, an original BEiT checkpoint) gives timm's ``Beit`` instead, per-block relative
    position bias initialised from the shared table, with the same ``load_report``, a
    ``config`` (its :class:`~lomar.models.beit.BEiTConfig`) and the same forward contract
    (:func:`_load_beit`). The pretraining pixel head, mask token, decoder
    and LoMaR's unused ``pos_embed`` are dropped (SPEC §3). ``overrides`` change the
    architecture's free settings (``img_size``, ``drop_path``, ``attention``, ``window_size`` with
    ``global_blocks``, None there meaning ViTDet's layout for the depth); an absolute position table
    is interpolated to a new ``img_size``. ``num_classes > 0`` adds ``fc_norm`` + ``head``
    (``global_pool='cls'``: the pretrained final norm + ``head``), freshly initialised unless the
    source holds a head of the same size, pooled by ``global_pool``, and, where ``classes`` (the names of the head's
    rows) is given and the source saved its own (a ``lomar finetune`` checkpoint, its export), of the same classes: in
    another order, its rows are put in the order of ``classes`` (:func:`_head_rows`).

    Loading is strict about the encoder (any missing or misshapen encoder weight is an
    error naming it) and non-strict only for the classifier. The returned module carries
    ``load_report`` (:class:`LoadReport`) saying what was loaded, new and dropped.
    """
    # a run folder without an export (finetune's, or a pretraining stopped by a signal): the checkpoint every reader
    # reads of it, named here for the note on a stopped run; read() is given the path itself, whose refusal of a run
    # folder's damaged best.pt names its last.pt
    given = Path(path)
    path = readable_file(given)
    unfinished = path != given
    # Reading draws nothing from the global RNG (some formats build a model to read it): the new head and every
    # later draw of a run are then the same whatever form the same weights come in.
    heads = {"num_heads": overrides["num_heads"]} if overrides.get("num_heads") else {}
    with torch.random.fork_rng(devices=[]):
        reader, src = read(given)
        weights = reader.timm_weights(src, heads) if isinstance(reader, BEiTReader) else reader.encoder(src, heads)
    trained = []  # a stopped run's checkpoint, which `lomar pretrain ... && lomar knn RUN` reaches too (a stop exits 0)
    if is_integer(step := src.data.get("step")):
        # only pretraining ends with an export (a finetune run's folder holds none when it has finished too); a
        # checkpoint that names no kind is a pretraining one saved before checkpoints named it
        stopped = unfinished and run_command(src.data) in ("pretrain", None)
        trained.append(f"{path.parent} holds no export, so its run has not finished: loaded its last checkpoint, "
                       f"saved at step {step}" if stopped else f"saved at step {step}")
    if isinstance(reader, BEiTReader):
        return _load_beit(weights, src, num_classes, global_pool, overrides, trained)
    config, state = weights.config, dict(weights.state)
    unknown = sorted(set(overrides) - set(ViTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown encoder setting(s) {', '.join(unknown)}")
    if overrides.get("window_size") and overrides.get("global_blocks", ()) is None:
        overrides["global_blocks"] = vitdet_global_blocks(config.depth)
    config = replace(config, **overrides)
    model = VisionTransformer(config, num_classes=num_classes, global_pool=global_pool)
    report = LoadReport(weights.source, str(path), dropped=list(weights.dropped), notes=trained)
    if config.window_size and len(set(config.global_blocks)) >= config.depth:  # ViTDet's layout below 8 blocks, say
        report.notes.append(f"window_size={config.window_size} windows no block: all {config.depth} blocks attend "
                            f"globally (global_blocks={tuple(config.global_blocks)}); give fewer global blocks "
                            f"(global_blocks=({config.depth - 1},)) to window the others")
    own = model.state_dict()
    # A finetuned classifier has no final norm (it pools into fc_norm): as a plain encoder
    # it gets a fresh, identity-initialised one.
    from_classifier = any(k.startswith("fc_norm.") for k in state)
    saved = saved_class_names(src) if classes else None
    head = state.get("head.weight")
    if classes and saved is not None and head is not None and (bad := names_problem(saved, len(head))):
        raise ValueError(f"{path}: its classes {bad}; pass a checkpoint `lomar finetune` wrote")
    rows, note = _head_rows(saved, classes)
    same_size = head is not None and "head.weight" in own and own["head.weight"].shape == head.shape
    if same_size and (note is None or rows is not None) and (pooled := classifier_pool(src.data, state)) != global_pool:
        # its rows would score other features than it learnt to (read_export's rule too: another pooling, another head)
        rows, note = None, (f"its head pooled by global_pool={pooled}, not {global_pool}, so the head is initialised "
                            f"afresh (global_pool={pooled} keeps it)")
    report.notes += [note] if note else []
    fresh_head = note is not None and rows is None
    for key in [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]:
        if key not in own or own[key].shape != state[key].shape or (fresh_head and key.startswith("head.")):
            report.dropped.append(key)
            del state[key]
        elif rows is not None and key.startswith("head."):  # row i scores the data's class i
            state[key] = state[key][rows]
    if num_classes and global_pool == "avg":
        state, unused = drop_final_norm(state)
        report.dropped.extend(unused)
    if "pos_embed" in state:
        if model.pos_embed is None:  # e.g. an abs-trained table offered to an RPE encoder
            report.dropped.append("pos_embed")
            del state["pos_embed"]
        elif (source := grid_size(weights.config.img_size, weights.config.patch_size)) != model.grid:
            # from the saved grid (a 2x8 one is not 4x4; a 4x6 one cannot be read as square), as every loader does
            state["pos_embed"] = model.fit_pos_embed(state["pos_embed"], source)
            report.notes.append(f"position table interpolated from the {source[0]}x{source[1]} grid to the "
                                f"{model.grid[0]}x{model.grid[1]} grid")
    bad_shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    if bad_shapes:
        k = bad_shapes[0]
        raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)} but the encoder expects "
                         f"{tuple(own[k].shape)}; the overrides do not fit these weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a relative position term the source lacks starts at zero, as ViTDet's and mmsegmentation's do
    not_classifier = [k for k in missing if not k.startswith(CLASSIFIER_PREFIXES)
                      and not (from_classifier and k.startswith("norm."))
                      and k.rsplit(".", 1)[-1] not in REL_POS_PARAMS]
    if not_classifier or unexpected:
        raise ValueError(f"{path} does not hold a complete encoder for {config}: missing "
                         f"{not_classifier or 'nothing'}, unexpected {unexpected or 'nothing'}")
    report.loaded, report.fresh = len(state), list(missing)
    check_finite(model, path)
    model.load_report = report
    return model


def _head_rows(saved, classes: list[str] | None) -> tuple[list[int] | None, str | None]:
    """(the rows of a source's head in the data's order, the note that says so) where ``saved`` (the names of its
    rows) are ``classes`` in another order; (None, the note that the head starts afresh) where they are other names
    (kept, row i would score another class: relabelling them silently, as ``lomar finetune --resume`` refuses to);
    (None, None) where either list is unknown or they are the same. One rule with --eval-only's
    (:func:`lomar.data.class_names.rows_by_name`)."""
    if classes is None or not isinstance(saved, (list, tuple)) or list(saved) == list(classes):
        return None, None
    if (rows := rows_by_name(saved, classes)) is not None:
        return rows, (f"its head's rows put in the data's class order (the same {len(rows)} classes, saved in another "
                      f"order)")
    only = classes_only_in(saved, classes)[0]
    differ = f"e.g. {brief(only[0])} is not one of the data's" if only != "none" else f"the data has {len(classes)}"
    return None, (f"its head was trained on other classes ({len(saved)}, {differ}), so the head is initialised "
                  f"afresh{unicode_forms_note(list(saved), classes)}")


def _load_beit(weights, src, num_classes: int, global_pool: str, overrides: dict, notes: list[str]):
    """timm's ``Beit`` (a :class:`~lomar.models.beit_classifier.BEiTClassifier`, whose model spec rebuilds it) from a
    BEiT source; ``overrides``: ``img_size``, ``drop_path`` (``num_heads`` is read);
    ``notes``: its ``load_report``'s first notes.

    ``num_classes > 0`` adds a fresh head: ``global_pool='avg'`` mean-pools the un-normed patch
    tokens into a fresh ``fc_norm`` (the final norm dropped: the original BEiT finetuning),
    ``'cls'`` the normed cls token. Without a head the final norm is kept, so
    ``forward_features`` gives (B, 1+L, D) normed tokens. A new ``img_size`` resizes the relative
    position tables with timm's own filter (``checkpoint_filter_fn``).
    """
    from timm.models.beit import checkpoint_filter_fn  # timm imports torchvision and torch._dynamo: for a BEiT

    from lomar.models.beit_classifier import BEiTClassifier  # timm's Beit: as above

    unknown = sorted(set(overrides) - {"img_size", "drop_path", "num_heads"})
    if unknown:
        raise ValueError(f"unknown BEiT encoder setting(s) {', '.join(unknown)}; a BEiT encoder takes "
                         f"img_size and drop_path")
    if global_pool not in ("avg", "cls"):
        raise ValueError(f"global_pool must be avg or cls, got {global_pool!r}")
    img_size, drop_path = overrides.get("img_size"), overrides.get("drop_path")
    patch = weights.config.patch_size
    if img_size is not None and img_size % patch:
        raise ValueError(f"img_size={img_size} is not a multiple of the BEiT patch size {patch}; "
                         f"use {max(1, img_size // patch) * patch}")
    # the config it is finetuned as, which its checkpoint's model spec saves
    config = replace(weights.config, img_size=weights.config.img_size if img_size is None else img_size,
                     drop_path_rate=drop_path or 0.0)
    model = BEiTClassifier(config, num_classes, timm_global_pool(global_pool, num_classes))
    state, dropped = drop_final_norm(weights.state) if model.global_pool == "avg" else (dict(weights.state), [])
    report = LoadReport(weights.source, str(src.path), loaded=len(weights.state) - len(dropped),
                        dropped=weights.dropped + dropped, notes=list(notes))
    if config.img_size != weights.config.img_size:
        with warnings.catch_warnings():  # torch's notes on timm's resampling code (deprecated indexing, a
            # non-contiguous searchsorted input), printed to a user who changed only --img-size: not theirs to act on
            for note in _TIMM_RESAMPLE_NOTES:  # those two alone: any other warning of that code is still shown
                warnings.filterwarnings("ignore", note, UserWarning, r"timm\.layers\.interpolate")
            state = checkpoint_filter_fn(state, model)
        report.notes.append(f"relative position tables resized to the {img_size // patch}x{img_size // patch} grid")
    missing, unexpected = model.load_state_dict(state, strict=False)
    report.fresh = [k for k in missing if k.startswith(("head.", "fc_norm."))]
    if unexpected or set(missing) - set(report.fresh):
        raise ValueError(f"the BEiT weights do not fit timm's Beit of {config}: missing "
                         f"{sorted(set(missing) - set(report.fresh)) or 'nothing'}, "
                         f"unexpected {unexpected or 'nothing'}")
    check_finite(model, src.path)
    model.load_report = report
    return model


def eval_transform(img_size: int):
    """Resize the short side to :func:`~lomar.data.classify.eval_resize` (bicubic; crop ratio 0.875 up to 224 px, 1.0
    above, as finetune evaluates), centre-crop, ImageNet-normalise (strips cut to
    :data:`lomar.data.classify.MAX_ASPECT` first: :func:`~lomar.data.classify.bound_aspect`)."""
    from torchvision.transforms import v2  # torchvision imports torch._dynamo (about a second): only when used

    return v2.Compose([bound_aspect, v2.ToImage(), v2.RGB(),
                       v2.Resize(eval_resize(img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(img_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def knn_loaders(train: str | Path, val: str | Path | None = None, img_size: int = 224, batch_size: int = 128,
                workers: int = 4, worker_init_fn=None, decode: str = "full",
                warn: bool = True) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders of class-folder splits with :func:`eval_transform`, unshuffled (``worker_init_fn``: the
    DataLoader's, e.g. a training run's, whose workers leave its stop signals to it). ``decode="draft"`` decodes a
    JPEG at the smallest DCT scale that keeps its short side at least the resize's
    (:func:`lomar.data.decode.load_image_reduced`: a 12 MP photo at 1/8, 4x faster; pixels within about a level).

    ``train`` alone is a root holding ``train/`` and ``val/``. Unreadable images are skipped
    (each batch is a :class:`lomar.data.collate.LabelledBatch` naming them). Raises ValueError
    naming a missing split or a class mismatch. ``warn`` False: what listing the folders finds (files left out,
    links, empty classes) is not said, as by the torchrun processes of a machine but its first, which says it.
    """
    roots = (Path(train), Path(val)) if val is not None else (Path(train) / "train", Path(train) / "val")
    load = eval_load(img_size, decode)
    with said_by_first_on_machine(say=warn):
        # either load fails where load_image fails: checked as load_image is (LabelledImageFolder's default)
        sets = [LabelledImageFolder(root, eval_transform(img_size), load) for root in roots]
        sets[0].match_classes(sets[1])
        sets[0].check_classes()
    return tuple(DataLoader(s, batch_size, shuffle=False, num_workers=workers,  # type: ignore[return-value]
                            collate_fn=collate_labelled, worker_init_fn=worker_init_fn) for s in sets)


def eval_load(img_size: int, decode: str = "full"):
    """How knn and linprobe read an image file for :func:`eval_transform` (and ``lomar predict`` a saved probe's):
    path -> uint8 (3, H, W), the whole image, or under ``decode="draft"`` a JPEG at the smallest DCT scale that keeps
    its short side at least the resize's. ValueError for another ``decode``."""
    if decode not in ("full", "draft"):
        raise ValueError(f"decode must be full or draft, got {decode!r}")
    return partial(load_image_reduced, min_side=eval_resize(img_size)) if decode == "draft" else load_image


@torch.no_grad()
def extract_features(encoder: VisionTransformer, loader, device: torch.device | str = "cpu",
                     pool: Pool = "mean", bad: BadDataTracker | None = None,
                     desc: str = "features", small: SmallImages | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image: (N, D) float32 on CPU, and (N,) labels.

    ``pool='mean'`` (default) averages the normed patch tokens; ``'cls'`` takes the normed
    cls token. LoMaR never gives the cls token a summarising role (each sequence only
    reconstructs its own window, and the cls output is dropped), so the mean is the fair
    feature for both methods; MAE's own linear probe reads the cls token. Unreadable images
    (batches from :func:`knn_loaders`) are skipped and counted (in ``bad`` when given); more than
    ``UNREADABLE_LIMIT`` of the split is a UsageError naming its folder: a score over part of a split
    is not that split's score. Progress (``desc``) goes to stderr (:func:`lomar.progress_bar.progress`).
    ``small``, where given, counts the images smaller than its size (upscaled by the resize).
    """
    bad = BadDataTracker(len(loader.dataset), warn=False) if bad is None else bad  # the loader warned of each
    feats, labels = read_features(encoder, loader, device, pool, bad, desc, small)
    check_read(loader.dataset, len(feats), bad)
    return feats, labels


@torch.no_grad()
def read_features(encoder: VisionTransformer, loader, device: torch.device | str, pool: Pool, bad: BadDataTracker,
                  desc: str | None, small: SmallImages | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` without its checks: (N, D) features ((0,) when none was read) and (N,) labels;
    ``desc`` None: no progress bar."""
    # One (N, D) block filled batch by batch: a list of batches joined at the end held every feature twice (3.9 GB
    # more for ImageNet's training split with ViT-B). More rows than the dataset (a sampler that repeats) grow it.
    feats, filled, labels = torch.empty(0), 0, []
    with eval_mode(encoder):
        for batch in loader if desc is None else progress(loader, total=len(loader), desc=desc, unit="batch"):
            images, targets = batch[0], batch[1]
            bad.update(list(getattr(batch, "bad", [])), len(targets) + len(getattr(batch, "bad", [])))
            if small is not None:
                small.add(getattr(batch, "sources", ()))
            if len(targets) == 0:  # every image of the batch was unreadable
                continue
            tokens = encoder.forward_features(images.to(device, non_blocking=True))  # (B, 1+L, D)
            pooled = pooled_features(tokens, pool)  # as a saved probe's classifier pools them
            if filled + len(pooled) > len(feats):
                grown = torch.empty(max(len(loader.dataset), 2 * filled, filled + len(pooled)), pooled.shape[1])
                if filled:
                    grown[:filled] = feats[:filled]
                feats = grown
            feats[filled:filled + len(pooled)] = pooled.cpu()
            filled += len(pooled)
            labels.append(torch.as_tensor(targets).cpu())
    return feats[:filled], torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)


def check_read(dataset, filled: int, bad: BadDataTracker) -> None:
    """UsageError naming ``dataset``'s folder when none of its images (``filled`` were read) or more than
    ``UNREADABLE_LIMIT`` of them (``bad``) could not be used: a score over part of a split is not that split's."""
    check_split(getattr(dataset, "root", None), len(dataset), filled, bad)


def check_split(root, total: int, filled: int, bad: BadDataTracker) -> None:
    """:func:`check_read` of the split ``root`` (None: unnamed) of ``total`` images."""
    if not filled:  # every image unreadable: nothing to evaluate on
        raise UsageError(f"no image {f'in {root} ' if root else ''}could be read ({total} tried); "
                         f"fix or replace them")
    try:
        bad.check(UNREADABLE_LIMIT)
    except ValueError as exc:
        raise UsageError(f"{root or 'the split'}: {exc}") from None


def skipped_note(root, count: int) -> str:
    """What a score over part of the split ``root`` says of its ``count`` unreadable images (each warned of by name
    when read), within the ``UNREADABLE_LIMIT`` it allows."""
    return f"{root}: {count} unreadable image(s) skipped, at most {UNREADABLE_LIMIT:.0%} of a split"
