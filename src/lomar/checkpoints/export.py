"""Weights-only export of an encoder: safetensors + config.json, and loading it back.

An export folder is untrusted input: :func:`read_export` checks ``config.json``'s types and
bounds and the weights file's format, names and shapes (from its header, against
:func:`expected_shapes`) before any model is built or any tensor is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

from safetensors import safe_open
from safetensors.torch import load_file

from lomar.checkpoints.export_write import write_export
from lomar.checkpoints.file_names import CONFIG_NAME, ENCODER_WEIGHTS
from lomar.checkpoints.io import check_finite
from lomar.data.class_names import names_problem
from lomar.data.classify import eval_crop_ratio
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lomar.errors import UsageError
from lomar.limits import MAX_IMG_SIZE
from lomar.models.attention import ATTENTION_MODES
from lomar.models.masking import grid_size
from lomar.models.vit import MODEL_SIZES, PATCH_SIZES, VisionTransformer, ViTConfig
from lomar.values import as_sides

__all__ = ["Export", "export_encoder", "create_encoder", "read_export", "expected_shapes", "timm_architecture"]

_T = TypeVar("_T")
# safetensors' names of the dtypes weights may come in (float8 would lose them: no encoder is saved so)
_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
# (type, lowest, highest) of each architecture field; generous, but far below what exhausts memory.
_BOUNDS: dict[str, tuple[type | tuple[type, ...], float, float]] = {
    "patch_size": (int, 1, 1024), "in_chans": (int, 1, 64), "embed_dim": (int, 1, 8192), "depth": (int, 1, 64),
    "num_heads": (int, 1, 8192), "mlp_ratio": ((int, float), 0.01, 16), "drop_path": ((int, float), 0, 0.999),
    "num_classes": (int, 0, 1_000_000), "window_size": (int, 0, 8192),
}


def timm_architecture(config: ViTConfig, num_classes: int = 0, global_pool: str = "avg") -> tuple[str, dict, dict]:
    """timm name (``lomar_vit_{size}_patch{p}``), constructor args and pretrained_cfg of an encoder.

    The args always spell out the architecture, so non-standard widths rebuild exactly. Written
    into ``config.json`` so that ``timm.create_model('local-dir:DIR', pretrained=True)`` works
    (after ``import lomar.timm_models``). ViTDet windows are part of the architecture (the same
    weights with global attention are another model); ``attention`` is not: every mode gives the
    same result, and the machine that loads the export picks its own (``auto``).
    """
    shape = (config.embed_dim, config.depth, config.num_heads)
    size = next((s for s, v in MODEL_SIZES.items() if v == shape), None)
    # Another shape: the nearest of the paper's sizes names it (model_args spell out the real one).
    size = size or min((s for s in MODEL_SIZES if s != "mini"), key=lambda s: abs(MODEL_SIZES[s][0] - config.embed_dim))
    patch = config.patch_size if config.patch_size in PATCH_SIZES else 16
    args = {k: config.to_dict()[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                              "num_heads", "mlp_ratio", "pos")}
    if config.window_size > 0:  # only then: plain exports keep the config.json they always had
        args.update(window_size=config.window_size, global_blocks=list(config.global_blocks))
    if num_classes:  # as timm's own exports: a build from the name and model_args alone holds the head
        args["num_classes"] = num_classes
    if num_classes and global_pool == "cls":  # timm's name for the cls token's pooling
        args["global_pool"] = "token"
    return f"lomar_vit_{size}_patch{patch}", args, timm_pretrained_cfg(config.in_chans, config.img_size, num_classes)


def timm_pretrained_cfg(in_chans: int, img_size: int | tuple[int, int], num_classes: int) -> dict:
    """The ``pretrained_cfg`` an export's config.json gives timm: input size (C, H, W), ImageNet normalisation with
    one value per input channel (timm's eval transform normalises with them as given), and lomar's own eval crop
    (:func:`~lomar.data.classify.eval_crop_ratio`: a classifier's as `lomar finetune` scored it, an encoder's, any
    method's, as knn and linprobe crop)."""
    crop = eval_crop_ratio(max(as_sides(img_size)))
    return {"input_size": [in_chans, *as_sides(img_size)], "interpolation": "bicubic", "crop_pct": crop,
            "mean": _per_channel(IMAGENET_MEAN, in_chans), "std": _per_channel(IMAGENET_STD, in_chans),
            "num_classes": num_classes,
            "first_conv": "patch_embed.proj", "fixed_input_size": False, "license": "apache-2.0"}


def _per_channel(rgb: tuple[float, ...], in_chans: int) -> list[float]:
    """ImageNet's RGB statistic for ``in_chans`` channels as timm's adapt_input_conv maps an RGB stem onto them: one
    grey channel takes all three (their mean: the stem's weights summed), others cycle through R, G, B."""
    return [round(sum(rgb) / len(rgb), 4)] if in_chans == 1 else [rgb[c % len(rgb)] for c in range(in_chans)]


def _is_our_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and str(data.get("architecture", "")).startswith("lomar_") and "model_args" in data


def export_encoder(encoder: VisionTransformer, out_dir: str | Path, weights_name: str = ENCODER_WEIGHTS,
                   metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``weights_name`` (safetensors) and ``config.json`` for the encoder into ``out_dir``.

    Both change at once (:func:`write_export`), with mode 0644. A ``config.json`` already in ``out_dir`` that
    is not one of ours is never replaced unless ``overwrite`` (UsageError). A LoMaR or MAE model
    exports its ``encoder``.
    """
    if not isinstance(encoder, VisionTransformer):
        if not isinstance(getattr(encoder, "encoder", None), VisionTransformer):
            # a BEiT (or BEiTPretrain, holding one as .beit) is exported in timm's Beit layout by its own writer
            held = "model.beit" if hasattr(encoder, "beit") else "model"
            beit = (f"; export a BEiT with lomar.checkpoints.export_beit.export_beit_encoder({held}, DIR)"
                    if "BEiT" in type(encoder).__name__ else "")
            raise TypeError(f"export_encoder takes a lomar.VisionTransformer (or a LoMaR / MAE model), got "
                            f"{type(encoder).__name__}{beit}")
        encoder = encoder.encoder
    if encoder.config.rel_pos != "none":
        raise ValueError(f"this encoder carries a dense task's relative position term (rel_pos="
                         f"{encoder.config.rel_pos!r}), which an export (timm's ViT) has no place for; keep the task's "
                         f"checkpoint, or export the pretrained encoder it started from")
    if Path(weights_name).name != weights_name or weights_name in ("", ".", ".."):
        raise ValueError(f"weights_name must be a file name (the export is one folder), got {weights_name!r}")
    out = Path(out_dir)
    if (out / CONFIG_NAME).exists() and not overwrite and not _is_our_config(out / CONFIG_NAME):
        raise UsageError(f"{out / CONFIG_NAME} exists and is not a lomar export; pass --overwrite "
                         f"(overwrite=True) to replace it, or export to another folder")
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    pool = {"avg": "avg", "cls": "cls", "token": "cls"}.get(encoder.global_pool) if encoder.num_classes else "avg"
    if pool is None:  # timm's "max" or "" pooling: no export format rebuilds it
        raise ValueError(f"an export holds an encoder, or a classifier pooling by 'avg' or 'cls' (timm's 'token'); "
                         f"got global_pool {encoder.global_pool!r}")
    name, model_args, pretrained_cfg = timm_architecture(encoder.config, encoder.num_classes, pool)
    config = {"architecture": name, "weights": weights_name, **encoder.config.to_dict(),
              "num_classes": encoder.num_classes, **({"global_pool": pool} if pool != "avg" else {}),
              "model_args": model_args, "pretrained_cfg": pretrained_cfg, **(metadata or {})}
    return write_export(out, weights_name, state, config)


def check_bounds(where: Path | str, data: dict, bounds: dict | None = None,
                 fix: str = "re-export the encoder with `lomar export`") -> None:
    """UsageError naming the first architecture field of ``data`` outside its type and bounds (:data:`_BOUNDS`)."""
    for key, (kind, low, high) in (bounds or _BOUNDS).items():
        value = data.get(key)  # the finite bounds also refuse inf and nan
        if key in data and not (isinstance(value, kind) and not isinstance(value, bool) and low <= value <= high):
            names = kind.__name__ if isinstance(kind, type) else "number"
            raise UsageError(f"{where}: {key} must be a{'n' if names[0] in 'ai' else ''} {names} in [{low}, {high}], "
                             f"got {value!r}; {fix}")


def read_config_json(config_path: Path) -> dict:
    """An export's config.json as a dict; UsageError for anything else (deep nesting included: a RecursionError)."""
    try:
        data = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UsageError(f"{config_path} is not valid JSON ({reason}); re-export the encoder") from None
    if not isinstance(data, dict):
        raise UsageError(f"{config_path} holds a JSON {type(data).__name__}, expected an object; re-export the encoder")
    return data


def weights_path(folder: Path, data: dict, default: str = ENCODER_WEIGHTS) -> Path:
    """The weights file config.json names (``weights``): a file in the export's own folder, or UsageError."""
    name = data.get("weights", default)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise UsageError(f"{folder / CONFIG_NAME}: weights must be a file name in the same folder, got {name!r}")
    if not (folder / name).is_file():
        raise UsageError(f"{folder / name} not found (named by {folder / CONFIG_NAME}); re-export the encoder")
    return folder / name


def header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a safetensors file's header, reading no tensor; UsageError if it is not one, or
    if a tensor is not floating-point (loading would cast integers, booleans or complex numbers into weights)."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: tuple(item.get_shape()) for key, item in slices.items()}
            dtypes = {key: item.get_dtype() for key, item in slices.items()}
    except Exception as exc:  # safetensors raises its own error types for any malformed header
        raise UsageError(f"{weights} is not a safetensors file ({str(exc).splitlines()[0][:120]}); "
                         f"re-export the encoder with `lomar export`") from None
    if odd := sorted(f"{key} ({dtype})" for key, dtype in dtypes.items() if dtype not in _WEIGHT_DTYPES):
        raise UsageError(f"{weights} holds tensors in a dtype no weights are saved in: {', '.join(odd[:3])}; "
                         f"pass an encoder's weights (F32, F16, BF16 or F64), or re-export it with `lomar export`")
    return shapes


def check_fits(weights: Path, config_path: Path, expected: dict[str, tuple[int, ...]],
               shapes: dict[str, tuple[int, ...]], absent_ok: tuple[str, ...] = (),
               reshaped_ok: tuple[str, ...] = ()) -> None:
    """UsageError unless the weights' names and ``shapes`` are the ``expected`` ones; keys starting with
    ``absent_ok`` may be missing or extra, those with ``reshaped_ok`` of another shape (a new head)."""
    missing = [k for k in expected if k not in shapes and not k.startswith(absent_ok)]
    unexpected = [k for k in shapes if k not in expected and not k.startswith(absent_ok)]
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in shapes
             if k in expected and shapes[k] != expected[k] and not k.startswith(reshaped_ok)]
    if missing or unexpected or wrong:
        raise UsageError(f"{weights} does not match {config_path}: missing {missing[:4] or 'nothing'}, unexpected "
                         f"{unexpected[:4] or 'nothing'}, wrong shapes {wrong[:4] or 'none'}")


def _check_config(where: Path, data: dict, overrides: dict) -> tuple[ViTConfig, int, str]:
    if unknown := sorted(set(overrides) - set(ViTConfig.__dataclass_fields__) - {"num_classes", "global_pool"}):
        raise UsageError(f"unknown encoder setting(s) {', '.join(unknown)}; pass ViTConfig fields, num_classes or "
                         f"global_pool")
    # a bad value the caller gave is the caller's to fix, not the file's
    check_bounds("the encoder settings given", overrides, fix="pass another value")
    data = {**data, **overrides}
    check_bounds(where, data)
    img = data.get("img_size", 224)
    sides = list(img) if isinstance(img, (list, tuple)) and len(img) == 2 else [img]  # a caller's (h, w) too
    if not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_IMG_SIZE for s in sides):
        raise UsageError(f"{where}: img_size must be an integer (or [height, width]) in [1, {MAX_IMG_SIZE}], "
                         f"got {img!r}")
    if data.get("global_pool", "avg") not in ("avg", "cls"):
        raise UsageError(f"{where}: global_pool must be 'avg' or 'cls', got {data.get('global_pool')!r}")
    if data.get("rel_pos", "none") != "none":
        raise UsageError(f"{where}: rel_pos must be 'none' in an export (a dense task's term is not exported), got "
                         f"{data.get('rel_pos')!r}")
    if data.get("pos", "rpe") not in ("rpe", "abs", "none"):
        raise UsageError(f"{where}: pos must be 'rpe', 'abs' or 'none', got {data.get('pos')!r}")
    blocks, depth = data.get("global_blocks", []), data.get("depth", ViTConfig.depth)
    ints = isinstance(blocks, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in blocks)
    if not ints or len(set(blocks)) != len(blocks) or not all(0 <= i < depth for i in blocks):
        raise UsageError(f"{where}: global_blocks must be a list of distinct block indices in [0, {depth - 1}], "
                         f"got {blocks!r}; re-export the encoder with `lomar export`")
    attention = data.get("attention", "auto")
    if not isinstance(attention, str) or attention not in ATTENTION_MODES:
        raise UsageError(f"{where}: attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    # The recorded attention mode was the exporting machine's choice (flex needs CUDA to train);
    # all modes agree, so the export is rebuilt with `auto` unless the caller asks otherwise.
    try:
        config = ViTConfig.from_dict({**data, "img_size": tuple(sides) if len(sides) == 2 else sides[0],
                                      "attention": overrides.get("attention", "auto")})
    except ValueError as exc:  # the sizes' relations (width over heads)
        raise UsageError(f"{where}: {exc}; re-export the encoder with `lomar export`") from None
    if any(s % config.patch_size for s in sides):
        raise UsageError(f"{where}: img_size {img} is not a multiple of patch_size {config.patch_size}")
    return config, int(data.get("num_classes", 0)), data.get("global_pool", "avg")


# What config.json says twice: timm builds from model_args, lomar from the top level (absent: these defaults)
_TWICE = {"img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 768, "depth": 12, "num_heads": 12,
          "mlp_ratio": 4.0, "pos": "rpe", "window_size": 0, "global_blocks": [], "num_classes": 0}


def _check_model_args(where: Path, data: dict) -> None:
    """UsageError where model_args and the top level disagree: one export would be two models, lomar's and timm's
    (a window size edited in one place changes attention, not a single weight's shape)."""
    args = data.get("model_args")
    if not isinstance(args, dict):  # timm refuses such a folder itself; lomar needs only the top level
        return
    for key, default in _TWICE.items():
        if key == "num_classes" and key not in args:  # an export written before model_args named the head
            continue
        top, arg = data.get(key, default), args.get(key, default)
        if top != arg and not (key == "img_size" and isinstance(top, list) and top == [arg, arg]):
            raise UsageError(f"{where}: model_args {key}={arg!r} but {key}={top!r}; timm builds from model_args and "
                             f"lomar from the top level, so they must agree: re-export the encoder with `lomar export`")


def _check_model_args_pool(where: Path, data: dict) -> None:
    """UsageError where model_args' pooling (timm's words: 'token' for lomar's 'cls') is not the top level's: timm
    and lomar would pool one classifier two ways. Checked before the shapes, which follow the top level's (fc_norm for
    'avg', norm for 'cls') and would name tensors, not the edit."""
    args, top = data.get("model_args"), data.get("global_pool", "avg")
    if isinstance(args, dict) and (arg := args.get("global_pool", "avg")) != (timm := {"cls": "token"}.get(top, top)):
        raise UsageError(f"{where}: model_args global_pool={arg!r} but global_pool={top!r} (timm's {timm!r}); timm "
                         f"builds from model_args and lomar from the top level, so they must agree: re-export the "
                         f"encoder with `lomar export`")


def expected_shapes(config: ViTConfig, num_classes: int = 0, global_pool: str = "avg") -> dict[str, tuple[int, ...]]:
    """The state dict shapes of ``VisionTransformer(config, num_classes, global_pool)``, without building it.

    (Building on the meta device is not possible: the drop-path schedule reads tensor values.)
    A test compares this with real models, so it cannot drift from :mod:`lomar.models.vit`.
    """
    d, p, hidden = config.embed_dim, config.patch_size, int(config.embed_dim * config.mlp_ratio)
    sides = as_sides(config.img_size)
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, config.in_chans, p, p),
                                          "patch_embed.proj.bias": (d,)}
    if config.pos == "abs":
        shapes["pos_embed"] = (1, 1 + (sides[0] // p) * (sides[1] // p), d)
    for i in range(config.depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)})
        if config.pos == "rpe":
            shapes[b + "attn.rpe.table"] = (1, d // config.num_heads, 50)
        shapes.update({b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (hidden, d),
                       b + "mlp.fc1.bias": (hidden,), b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
    # an averaging classifier pools un-normed tokens into fc_norm; a cls one keeps the final norm
    norm = "fc_norm" if num_classes and global_pool == "avg" else "norm"
    shapes.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
    if num_classes:
        shapes.update({"head.weight": (num_classes, d), "head.bias": (num_classes,)})
    return shapes


class Export(NamedTuple):
    """What :func:`read_export` found: the architecture, the classifier asked for and where the weights are."""

    config: ViTConfig
    num_classes: int
    weights: Path
    global_pool: str
    new_head: bool  # another head (size or pooling) than the export's: it starts fresh
    table_grid: tuple[int, int] | None = None  # the saved absolute table's grid, when img_size=... asks for another
    classes: list[str] | None = None  # its head's rows' class names (config.json's label_names, timm's key), if kept


def read_export(path: str | Path, **overrides) -> Export:
    """Validate an export folder (:class:`Export`). Builds no model.

    ``overrides`` (ViTConfig fields, ``num_classes``, ``global_pool``) replace config.json's values. Raises
    FileNotFoundError when there is no config.json, UsageError for anything malformed.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME
    if path.is_file():  # else "mw.pt/config.json not found" would hide that the path is a checkpoint, not a folder
        raise FileNotFoundError(f"{path} is a file, not an export folder (config.json + weights); export it with "
                                f"`lomar export`, or load a checkpoint with lomar.load_model")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; export an encoder first (lomar.export_encoder, or "
                                f"`lomar export`)")
    data = read_config_json(config_path)
    if data.get("method") == "beit":  # lomar's own, in timm's Beit layout: "not a lomar encoder" would be untrue
        raise UsageError(f"{path} is a BEiT export (timm's Beit layout), not a ViT encoder's; load it with "
                         f"lomar.load_model(DIR) (lomar's BEiT), lomar.checkpoints.export_beit.create_timm_beit(DIR) "
                         f"or timm.create_model('local-dir:DIR', pretrained=True)")
    if not str(data.get("architecture", "lomar_")).startswith("lomar_"):  # every lomar export's name starts so
        raise UsageError(f"{config_path} describes {data['architecture']!r}, not a lomar encoder (a timm or Hugging "
                         f"Face folder?); lomar reads folders written by `lomar export` / `lomar pretrain`, and "
                         f"original LoMaR / MAE / BEiT checkpoints; load this one with timm")
    config, num_classes, pool = _naming_theirs(overrides, config_path,
                                               lambda where: _check_config(where, data, overrides),
                                               own=lambda: _check_config(config_path, data, {}))
    weights = weights_path(path, data)
    shapes = header_shapes(weights)
    expected = expected_shapes(config, num_classes, pool)
    table_grid = None
    if "pos_embed" in expected and "img_size" in overrides:  # the saved table is of the exported size: fitted later
        saved, _, _ = _check_config(config_path, data, {**overrides, "img_size": data.get("img_size", 224)})
        expected["pos_embed"] = expected_shapes(saved)["pos_embed"]
        table_grid = grid_size(saved.img_size, saved.patch_size)
    # a caller asking for another head (or pooling): it starts fresh
    new_head = num_classes != data.get("num_classes", 0) or pool != data.get("global_pool", "avg")
    head = ("head.", "fc_norm.") if new_head else ()
    _check_model_args_pool(config_path, data)
    _naming_theirs(overrides, config_path,
                   lambda where: check_fits(weights, where, expected, shapes,
                                            absent_ok=(*head, "norm.") if new_head else (), reshaped_ok=head),
                   own=lambda: check_fits(weights, config_path,
                                          expected_shapes(*_check_config(config_path, data, {})), shapes))
    _check_model_args(config_path, data)  # after the shapes: a weights file that does not fit is the first problem
    if (names := data.get("label_names")) is not None and (bad := names_problem(names, data.get("num_classes", 0))):
        raise UsageError(f"{config_path}: label_names {bad}; re-export the classifier")
    return Export(config, num_classes, weights, pool, new_head, table_grid, None if new_head or not names else names)


def _sound(check: Callable[[], object]) -> bool:
    """Whether ``check`` passes (raises no UsageError)."""
    try:
        check()
    except UsageError:
        return False
    return True


def _naming_theirs(overrides: dict, config_path: Path, check: Callable[[Path | str], _T],
                   own: Callable[[], object]) -> _T:
    """``check(config_path)``, whose UsageError names the caller's ``overrides`` instead of config.json where they
    broke a config.json that is sound alone (``own``, the same check of its values without them, passes): theirs
    to drop, not the file's to fix."""
    try:
        return check(config_path)
    except UsageError:
        if not overrides or not _sound(own):
            raise
    settings = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
    return check(f"the settings given ({settings}; config.json's own fit the weights: drop them)")


def create_encoder(path: str | Path, **overrides) -> VisionTransformer:
    """Rebuild an exported encoder from its directory (config.json + safetensors weights).

    Everything is validated first (:func:`read_export`); ``overrides`` as there."""
    found = read_export(path, **overrides)
    encoder = VisionTransformer(found.config, num_classes=found.num_classes, global_pool=found.global_pool)
    state = load_file(str(found.weights))
    if found.new_head:  # another head (size or pooling) than the one exported: it starts fresh
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    if found.table_grid:  # resampled from the exported grid (untouched at it), as every loader does
        state["pos_embed"] = encoder.fit_pos_embed(state["pos_embed"], found.table_grid)
    encoder.load_state_dict(state, strict=False)
    check_finite(encoder, found.weights)
    return encoder
