"""Every checkpoint format lomar reads: detected once, one reader per format.

:func:`read` loads a path and :func:`identify` asks each registered
:class:`~lomar.checkpoints.reader.Reader` in priority order whether the loaded contents are its format (a
caller that holds them already identifies them without a second read), giving a ``Source``. A reader turns
a source into a full model (:meth:`Reader.model`, for ``export``/``visualize``) or into encoder
weights with our key names (:meth:`Reader.encoder`, for finetuning and probes). Our formats are here, BEiT's in
:mod:`~lomar.checkpoints.formats_beit`, ``lomar detect``'s and ``segment``'s in :mod:`~lomar.checkpoints.formats_dense`,
``lomar linprobe --save``'s in :mod:`~lomar.checkpoints.formats_probe`, the original code's in
:mod:`~lomar.checkpoints.original`. Priorities run from 5 (BEiT's, whose keys overlap ours) over 10 (ours) to 90.

A pretraining checkpoint holds a ``model_spec`` (:mod:`lomar.models.spec`), which rebuilds the
model without training code; checkpoints written before it are read from their saved settings. A
classifier's (``lomar finetune``, :func:`~lomar.checkpoints.convert.pretrain_checkpoint`) holds one too, of its
:class:`VisionTransformer`: its ViTConfig and head. One written before saved its ViTConfig alone (``lomar
finetune``: ``config``, a classifier checkpoint: ``vit_config``); the shapes of its weights tell the rest.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import lomar.checkpoints.formats_beit  # noqa: F401  registers BEiT's readers
import lomar.checkpoints.formats_dense  # noqa: F401  registers the dense models' reader
import lomar.checkpoints.original  # noqa: F401  registers the original-LoMaR/MAE readers
from lomar.checkpoints.export import create_encoder, read_export
from lomar.checkpoints.export_leftovers import export_set_aside, readable_file
from lomar.checkpoints.export_write import export_folder_of
from lomar.checkpoints.file_names import CONFIG_NAME
from lomar.checkpoints.formats_probe import probe_only_refusal  # and registers linprobe's reader
from lomar.checkpoints.io import mismatch, safe_load
from lomar.checkpoints.keys import args_dict, drop_final_norm, infer_vit_config, no_embed_class_note
from lomar.checkpoints.kinds import FINETUNE_FORMAT, classifier_pool
from lomar.checkpoints.reader import (
    EncoderWeights,
    Reader,
    Source,
    build_strict,
    folder_source,
    pretrain_spec,
    readers,
    refuse_unused,
    register,
    saved_spec,
    spec_settings,
)
from lomar.checkpoints.run_folder import run_checkpoints
from lomar.checkpoints.sharded import read_sharded
from lomar.checkpoints.timm_layout import lomar_layout, saved_size
from lomar.models.abs_pos import square_side
from lomar.models.masking import grid_size
from lomar.models.vit import VisionTransformer, ViTConfig
from lomar.values import command_line, is_size

__all__ = ["read", "identify", "VitReader", "load_model", "encoder_weights", "saved_class_names"]

# An encoder's settings that no weight fixes, which a caller may choose for a checkpoint that saved its ViTConfig
# too (``window_size`` is LoMaR's K among load_model's overrides, not the ViTDet windows a classifier saved).
_FREE = ("img_size", "attention", "drop_path")


def _refuse_other_heads(src: Source, where: str, saved: int, asked: int | None) -> None:
    """ValueError where a caller's ``num_heads`` (which fills in what a bare checkpoint cannot tell) contradicts the
    heads a saved config gives: not another model of the same weights, nor dropped without a word."""
    if asked and asked != saved:
        raise ValueError(f"{src.path}: its {where} gives num_heads {saved}; drop num_heads={asked} (a setting for "
                         f"checkpoints that save no ViTConfig)")


_VIT_ARCH = "lomar.models.vit:VisionTransformer"


def _vit_spec(src: Source) -> dict | None:
    """The model spec of a classifier or encoder checkpoint (None where it saved none). ValueError for a spec of
    another model beside a ViT's weights, or one without its config."""
    if src.data.get("model_spec") is None:
        return None
    spec = saved_spec(src, _VIT_ARCH, "its weights are a ViT's")
    if not isinstance(spec.get("config"), dict):
        raise ValueError(f"{src.path}: its model_spec holds no config mapping (its ViTConfig)")
    return spec


def _saved_keys(src: Source) -> list[str]:
    """Where a classifier checkpoint saved its ViTConfig, the one it is rebuilt from first: its ``model_spec``, and
    where older lomars read it (``lomar finetune``: ``config``, :func:`pretrain_checkpoint`: ``vit_config``), which a
    checkpoint saved before specs has alone (a ``config`` without a width is another run's settings)."""
    older = [k for k in ("config", "vit_config") if isinstance(src.data.get(k), dict) and "embed_dim" in src.data[k]]
    return (["model_spec"] if _vit_spec(src) is not None else []) + older


def _head(src: Source) -> tuple[int, str]:
    """(num_classes, global_pool) of a classifier or encoder checkpoint: its weights' head, pooled as its model spec
    says (which must name that head), else as :func:`classifier_pool` tells."""
    state = src.state
    rows = state["head.weight"].shape[0] if "head.weight" in state else 0
    pool = classifier_pool(src.data, state) if rows else src.data.get("global_pool") or "avg"
    if (spec := _vit_spec(src)) is None:
        return rows, pool
    args = spec.get("args")
    if not (isinstance(args, dict) and set(args) == {"num_classes", "global_pool"} and args["num_classes"] == rows
            and args["global_pool"] in ("avg", "cls")):
        raise ValueError(f"{src.path}: its model_spec's args {args!r} do not describe its weights ("
                         f"{f'a head of {rows} classes' if rows else 'no head'}; global_pool 'avg' or 'cls')")
    return rows, args["global_pool"]


def _saved_config(src: Source, num_heads: int | None = None) -> ViTConfig | None:
    """The ViTConfig a classifier checkpoint saved (the first of :func:`_saved_keys`), None where it saved none.
    ValueError where one it saved does not describe the weights beside it, told before any model of it is built (a
    small file that claims huge widths or sizes builds none), or where a caller's ``num_heads`` contradicts it, or
    where two it saved differ in what no weight fixes (windows, the size of a table-less encoder): load_model
    rebuilds from one and ``--eval-only`` takes its settings from the other."""
    keys = _saved_keys(src)
    configs = [_checked_config(src, key, num_heads) for key in keys]
    for key, config in zip(keys[1:], configs[1:]):
        if differ := [f"{name} {getattr(configs[0], name)!r} and {getattr(config, name)!r}"
                      for name in ViTConfig.__dataclass_fields__ if getattr(configs[0], name) != getattr(config, name)]:
            raise ValueError(f"{src.path}: its saved {keys[0]} and {key} describe other encoders ({', '.join(differ)});"
                             f" delete the one it was not trained as")
    return configs[0] if configs else None


def _checked_config(src: Source, key: str, num_heads: int | None) -> ViTConfig:
    """The ViTConfig a classifier checkpoint saved at ``key``, checked against its weights (:func:`_saved_config`)."""
    try:
        config = ViTConfig.from_dict(src.data[key]["config"] if key == "model_spec" else src.data[key])
        shapes = infer_vit_config(src.state, {"num_heads": config.num_heads}, img_size=config.img_size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{src.path}: its saved {key} is not its encoder's ViTConfig ({exc})") from None
    differ = [f"{name} {getattr(config, name)!r} (its weights: {getattr(shapes, name)!r})" for name in
              ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "pos", "rel_pos")
              if getattr(config, name) != getattr(shapes, name)]
    if (hidden := src.state["blocks.0.mlp.fc1.weight"].shape[0]) != int(config.embed_dim * config.mlp_ratio):
        differ.append(f"mlp_ratio {config.mlp_ratio:g} (its weights: {hidden / config.embed_dim:g})")
    grid = grid_size(config.img_size, config.patch_size)
    if config.pos == shapes.pos == "abs" and (patches := src.state["pos_embed"].shape[1] - 1) != grid[0] * grid[1]:
        differ.append(f"img_size {config.img_size!r} (its weights: a position table of {patches} patches)")
    if differ:
        raise ValueError(f"{src.path}: its saved {key} does not describe its weights: {', '.join(differ)}")
    _refuse_other_heads(src, f"saved {key}", config.num_heads, num_heads)
    # its attention was its machine's choice (flex trains on CUDA alone; all modes agree) and its drop path its
    # training's: this machine picks its own, a caller's training sets its own, as an export's reader does
    return replace(config, attention="auto", drop_path=0.0)


def _inferred_config(src: Source, overrides: dict) -> ViTConfig:
    """The encoder's config from its shapes and the sizes its run saved (an original checkpoint's ``args``)."""
    hints = args_dict(src.data, ("config", "vit_config", "args"))
    hints = {k: v for k, v in hints.items() if k in ("num_heads", "img_size", "input_size") and is_size(v)}
    return infer_vit_config(src.state, hints, src.path, **overrides)


def _unknown_grid(src: Source) -> ValueError:
    """A non-square table without a saved size, to be resampled: an export keeps the (height, width) given it."""
    export = command_line("lomar", "export", src.path, "--img-size", "HEIGHT", "WIDTH", "--to", "DIR")
    also = no_embed_class_note(src.state, "--img-size ")
    return ValueError(f"{src.path}: its position table holds {src.state['pos_embed'].shape[1] - 1} patches, not a "
                      f"square grid, and it saves no image size to resample it from; record the size it was trained "
                      f"at first: {export}, and read DIR{also}")


class PretrainReader(Reader):
    """Ours: ``lomar pretrain`` / ``load-original`` output of LoMaR or MAE: ``{"model", "model_spec",
    "config"}`` (checkpoints before ``model_spec``: their ``config`` settings)."""

    name = "lomar-pretrain"

    def detect(self, data, state):
        return isinstance(data.get("model_spec") or data.get("config"), dict) and any(
            k.startswith("encoder.") for k in state)

    def model(self, src, overrides):
        spec = pretrain_spec(src)  # what the overrides fill in for an original checkpoint, this one says itself
        refuse_unused(src.path, "a lomar pretraining checkpoint, which carries its own settings", overrides,
                      saved=spec_settings(spec))
        return build_strict(spec, src.state, src.path)

    def encoder(self, src, overrides):
        spec = pretrain_spec(src)
        state = {k.removeprefix("encoder."): v for k, v in src.state.items() if k.startswith("encoder.")}
        dropped = [k for k in src.state if not k.startswith("encoder.")]  # mask token, pixel head, decoder
        method = "mae" if ".mae" in spec["arch"] else "lomar" if ".lomar:" in spec["arch"] else spec["arch"]
        config = ViTConfig.from_dict(spec["config"])
        _refuse_other_heads(src, "saved model", config.num_heads, overrides.get("num_heads"))
        return EncoderWeights(config, state, dropped, f"pretrain checkpoint ({method})")


# Every key a VisionTransformer (encoder or classifier) has, and nothing else.
_VIT_KEY = re.compile(r"^(cls_token|pos_embed|(patch_embed\.proj|norm|fc_norm|head)\.(weight|bias)|blocks\.\d+\."
                      r"((norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|attn\.rpe\.table))$")


class VitReader(Reader):
    """Ours: a classifier, encoder or ``lomar finetune`` checkpoint (VisionTransformer key names).

    An original MAE finetuned classifier has the same keys and is read here too."""

    name = "lomar-vit"

    def detect(self, data, state):
        return "patch_embed.proj.weight" in state and all(_VIT_KEY.match(k) for k in state)

    def trained_config(self, src: Source, overrides: dict | None = None) -> ViTConfig:
        """The encoder's config as trained: the ViTConfig its checkpoint saved, else one inferred from its shapes
        (``overrides``: ``num_heads``, and ``img_size`` where nothing else tells a non-square table's grid)."""
        overrides = overrides or {}
        if (saved := _saved_config(src, overrides.get("num_heads"))) is not None:
            return saved
        try:
            return _inferred_config(src, {k: v for k, v in overrides.items() if k != "img_size"})
        except ValueError:  # no size saved and a non-square table: img_size can only name the table's own grid
            if "img_size" not in overrides:
                raise
        config = _inferred_config(src, overrides)
        grid = grid_size(config.img_size, config.patch_size)
        if config.pos == "abs" and src.state["pos_embed"].shape[1] - 1 != grid[0] * grid[1]:
            raise _unknown_grid(src)  # img_size is the size to resample to
        return config

    def model(self, src, overrides):
        refuse_unused(src.path, "a ViT classifier or encoder, no pretraining model", overrides, {"num_heads", *_FREE})
        table = src.state.get("pos_embed")
        bare = saved_size(src.data) is None and table is not None and square_side(table) is None
        if "img_size" in overrides and bare:
            # the size given names the trained grid (trained_config): its cells tell a timm no_embed_class table from
            # lomar's, which holds a class entry more
            src = replace(src, state=lomar_layout(src.state, src.path, overrides["img_size"], given=True))
        trained, state = self.trained_config(src, overrides), src.state
        config = replace(trained, **{k: v for k, v in overrides.items() if k in _FREE})
        num_classes, pool = _head(src)
        model = VisionTransformer(config, num_classes=num_classes, global_pool=pool)
        table, source = state.get("pos_embed"), grid_size(trained.img_size, trained.patch_size)
        if model.pos_embed is not None and table is not None and (
                source != model.grid or table.shape != model.pos_embed.shape):
            # resampled from the trained grid (untouched at it), as every loader does
            state = {**state, "pos_embed": model.fit_pos_embed(table, source)}
        if num_classes and pool == "avg":
            state, _ = drop_final_norm(state)
        unfit = (f"{src.path}: its weights do not fit the {config.embed_dim}-wide, {config.depth}-deep, "
                 f"{config.num_heads}-head encoder")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a shape that overrides changed (num_heads of an RPE encoder)
            heads = "; drop num_heads=... (its RPE tables tell its heads)" if "num_heads" in overrides else ""
            raise ValueError(f"{unfit}: {mismatch(exc).rstrip('.')}{heads}") from None
        if unexpected or set(missing) - {"pos_embed"}:
            raise ValueError(f"{unfit}: missing {missing}, unexpected {unexpected}")
        return model

    def encoder(self, src, overrides):
        try:
            config = self.trained_config(src, overrides)
        except ValueError as exc:  # no size to resample from: a caller's img_size is the size to resample to
            raise _unknown_grid(src) if "not a square grid" in str(exc) else exc from None
        kind = ("finetune" if src.data.get("format") == FINETUNE_FORMAT or "config" in _saved_keys(src) else
                "classifier" if "head.weight" in src.state else "ViT encoder")  # a head-less one: timm's num_classes=0
        return EncoderWeights(config, dict(src.state), [], f"{kind} checkpoint")


class ExportReader(Reader):
    """Ours: a folder written by ``lomar export`` or ``lomar pretrain`` (config.json + safetensors)."""

    name = "export"

    def detect_folder(self, path):
        return True

    def model(self, src, overrides):
        # window_size here is the command line's LoMaR window (K), not the export's ViTDet windows
        fields = set(ViTConfig.__dataclass_fields__) - {"window_size", "num_heads"}
        refuse_unused(src.path, "an exported encoder, no pretraining model", overrides, {"num_heads", *fields})
        encoder = create_encoder(src.path, **{k: v for k, v in overrides.items() if k in fields})
        _refuse_other_heads(src, CONFIG_NAME, encoder.config.num_heads, overrides.get("num_heads"))
        return encoder

    def encoder(self, src, overrides):
        encoder = create_encoder(src.path)
        _refuse_other_heads(src, CONFIG_NAME, encoder.config.num_heads, overrides.get("num_heads"))
        return EncoderWeights(encoder.config, encoder.state_dict(), [], folder_source(src.path, "exported folder"))


register(PretrainReader(), 10)
register(VitReader(), 20)
register(ExportReader(), 30)


def read(path: str | Path, mmap: bool = False) -> tuple[Reader, Source]:
    """Load what ``path`` names once and :func:`identify` it (``mmap``: map a checkpoint's tensors instead of reading
    them, enough to tell its format). A run folder without an export is its best.pt, else last.pt, else the
    checkpoint-N.dcp its last.json names (:func:`~lomar.checkpoints.export_leftovers.readable_file`, the rule every
    reader follows). Raises FileNotFoundError or ValueError naming the problem."""
    path = readable_file(given := Path(path))
    if path.is_dir() and (path / ".metadata").is_file():  # a sharded `lomar pretrain --fsdp` checkpoint
        return identify(path, read_sharded(path))
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            # a folder holding no checkpoint, or one whose export is set aside: name the checkpoints it keeps
            kept = " or ".join(str(file) for file in run_checkpoints(path))
            raise ValueError(f"{path} is a folder without {CONFIG_NAME}; {export_set_aside(path)}pass " + (
                f"its checkpoint, {kept}" if kept else "a checkpoint file or a folder written by `lomar export` / "
                                                      "`lomar pretrain`"))
        reader = next(r for r in readers() if r.detect_folder(path))
        return reader, Source(path, reader.name, {}, {})
    if (folder := export_folder_of(path)) is not None:  # an export's weights file: read with what its folder says
        return read(folder)
    try:
        data = safe_load(path, mmap=mmap)
    except ValueError as exc:  # a run folder's damaged best.pt: name its last.pt, which no reader falls back on
        if given == path or not (others := [file for file in run_checkpoints(given) if file != path]):
            raise
        raise ValueError(f"{exc}; or pass the run's other checkpoint, {others[0]}") from None
    return identify(path, data)


def read_mapped(path: str | Path) -> tuple[Reader, Source]:
    """:func:`read` with a checkpoint file's tensors mapped, not read (enough for its format and small entries); a
    file torch cannot map is read whole. A failure that is not the mapping's (a folder, a file that maps but is in no
    format) is raised as it is, not read again to fail alike."""
    try:
        return read(path, mmap=True)
    except ValueError:
        file = readable_file(Path(path))
        if file.is_dir() or _maps(file):
            raise
        return read(path)


def _maps(path: Path) -> bool:
    """Whether torch maps the checkpoint file ``path`` (a mapped load reads its small entries, no tensor): not one in
    its legacy (non-zip) format, nor one on a filesystem without mmap (some network mounts: ENODEV)."""
    try:
        safe_load(path, mmap=True)
    except ValueError:
        return False
    return True


def identify(path: str | Path, data: dict) -> tuple[Reader, Source]:
    """The reader of the checkpoint ``data`` loaded from the file ``path`` (held by a caller that read it already:
    it is not read again), and its source. ValueError naming a checkpoint in no format lomar reads."""
    path = Path(path)
    state = data.get("model", data)
    if (refusal := probe_only_refusal(path, data)) is not None:
        raise refusal
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict (a dict of tensors) under 'model'")
    for reader in readers():
        if reader.detect(data, state):
            return reader, Source(path, reader.name, data, state)
    sample = ", ".join(sorted(state)[:4]) or "no tensors"
    raise ValueError(f"checkpoint {path} is in no format lomar reads (keys: {sample}, ...); expected ours "
                     f"(lomar pretrain / finetune / export) or an original LoMaR / MAE / BEiT checkpoint")


def saved_class_names(src: Source) -> object:
    """The names of a classifier's head rows as its file saved them (a ``lomar finetune`` checkpoint's ``classes``, an
    export's ``label_names``, checked by :func:`~lomar.checkpoints.export.read_export`), None where it saved none."""
    return read_export(src.path).classes if src.format == ExportReader.name else src.data.get("classes")


def load_model(path: str | Path, **overrides) -> nn.Module:
    """A :class:`LoMaR`, :class:`MAE` or :class:`VisionTransformer` from any checkpoint or export; a ``lomar detect`` or
    ``lomar segment`` checkpoint's ViTMaskRCNN or UperNetSegmenter (:mod:`~lomar.checkpoints.formats_dense`); a
    finetuned BEiT's timm ``Beit`` (BEiTClassifier); ``lomar linprobe --save``'s ProbeClassifier.

    ``overrides`` (``num_heads``, ``img_size``, ``window_size``, ``num_windows``, ``decoder_num_heads``) fill in
    what an original checkpoint cannot tell; a classifier is rebuilt as it saved itself, at another ``img_size`` or
    ``attention`` where given; one its reader has no use for (LoMaR's windows for a classifier or an export) is
    refused. A run folder without an export is read through its best.pt, else last.pt, else the checkpoint-N.dcp its
    last.json names, as every reader reads one (:func:`~lomar.checkpoints.export_leftovers.readable_file`); one whose
    export is set aside (interrupted, or under way) is refused, naming the set-aside export. Raises ValueError or
    FileNotFoundError with a message that names the problem.
    """
    reader, src = read(path)
    return reader.model(src, {k: v for k, v in overrides.items() if v is not None})


def encoder_weights(path: str | Path, num_heads: int | None = None) -> EncoderWeights:
    """The encoder architecture and weights (VisionTransformer keys) of any checkpoint or export, a run folder read as
    :func:`read` reads one."""
    reader, src = read(path)
    return reader.encoder(src, {"num_heads": num_heads} if num_heads else {})
