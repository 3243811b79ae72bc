"""The checkpoints of ``lomar detect`` and ``lomar segment``, registered with the other readers
(:mod:`lomar.checkpoints.formats` asks them all).

A detector's or segmenter's ``best.pt`` / ``last.pt`` holds its ``model_spec`` (:mod:`lomar.models.spec`: a
:class:`~lomar.models.mask_rcnn.ViTMaskRCNN` or :class:`~lomar.models.segmenter.UperNetSegmenter` on its encoder's
ViTConfig), which :meth:`DenseReader.model` rebuilds with its weights. One saved before specs is rebuilt from what it
kept for ``--eval-only``: its ``encoder_config``, its run's ``settings`` and a detector's ``categories``, the head
settings the commands never change left at their defaults. Its encoder alone is no encoder to finetune or probe
(:meth:`DenseReader.encoder` refuses it, naming the one its run started from).
"""

from __future__ import annotations

from lomar.checkpoints.kinds import run_command
from lomar.checkpoints.reader import Reader, Source, build_strict, refuse_unused, register, saved_spec, spec_settings
from lomar.values import command_line

__all__ = ["DenseReader", "DENSE_ARCH", "whole_model_refusal"]

# The lomar.models class each command's checkpoint rebuilds (built from the spec by name: reading a checkpoint of
# another kind imports no torchvision detection code)
DENSE_ARCH = {"detect": "lomar.models.mask_rcnn:ViTMaskRCNN", "segment": "lomar.models.segmenter:UperNetSegmenter"}


def whole_model_refusal(path, checkpoint: dict) -> ValueError:
    """The error for a detector's or segmenter's checkpoint (at ``path``, ``checkpoint`` what it holds) given where an
    encoder or a pretraining model is read."""
    return ValueError(f"checkpoint {path} is a whole `lomar {run_command(checkpoint)}` model, not an encoder; pass "
                      f"the encoder that run started from (its --pretrained), or a pretraining checkpoint or export")


def _unbuildable(src: Source, command: str, lacking: str) -> ValueError:
    """The error for a checkpoint saved before specs that lacks what rebuilds it (``lacking``: 'its categories')."""
    return ValueError(f"{src.path}: a `lomar {command}` checkpoint saved without a model_spec and without {lacking}; "
                      f"it cannot be rebuilt from what it saved")


def _settings(src: Source, command: str, names: tuple[str, ...]) -> dict:
    """``names`` of the run settings a checkpoint saved before specs; ValueError naming the first it lacks."""
    settings = src.data.get("settings")
    missing = [n for n in names if not isinstance(settings, dict) or n not in settings]
    if missing:
        raise _unbuildable(src, command, f"its settings' {missing[0]}")
    return {n: settings[n] for n in names}


def _spec_before_specs(src: Source, command: str) -> dict:
    """The spec of a checkpoint saved before specs, from its ``encoder_config``, ``settings`` (and ``categories``)."""
    encoder = src.data.get("encoder_config")
    if not isinstance(encoder, dict):
        raise ValueError(f"{src.path}: a `lomar {command}` checkpoint saved without its encoder's layout (no "
                         f"model_spec, no encoder_config); "
                         f"`{command_line('lomar', command, '--eval-only', '--pretrained', src.path)}` "
                         f"scores it, rebuilding its encoder from the one its run started from")
    if command == "detect":
        categories = src.data.get("categories")
        if not isinstance(categories, list):
            raise _unbuildable(src, command, "its categories")
        args = {"num_classes": len(categories), "size": _settings(src, command, ("img_size",))["img_size"]}
        if isinstance(rois := src.data["settings"].get("rois_per_image"), int):  # the sampler it trained with
            args["rois_per_image"] = rois
    else:
        saved = _settings(src, command, ("num_classes", "head_channels", "aux_weight"))
        args = {"num_classes": saved["num_classes"], "channels": saved["head_channels"],
                "aux_weight": saved["aux_weight"]}
    return {"arch": DENSE_ARCH[command], "config": encoder, "args": args, "prefix": ""}


def dense_spec(src: Source) -> dict:
    """The model spec of a detector's or segmenter's checkpoint: saved, or derived from what it kept before specs.
    ValueError for a spec of another model, or one whose encoder or head differs from what ``--eval-only`` rebuilds
    (its ``encoder_config``, ``settings`` and ``categories``)."""
    command = run_command(src.data)
    spec = src.data.get("model_spec")
    if spec is None:
        return _spec_before_specs(src, command)
    saved_spec(src, DENSE_ARCH[command], f"it is a `lomar {command}` checkpoint")
    encoder = src.data.get("encoder_config")
    if isinstance(encoder, dict) and encoder != spec.get("config"):
        # load_model would rebuild the one and --eval-only the other
        raise ValueError(f"{src.path}: its model_spec's config and its encoder_config describe other encoders; "
                         f"delete the one it was not trained as")
    try:  # the head --eval-only rebuilds, as one saved before specs
        kept = _spec_before_specs(src, command)["args"]
    except ValueError:  # too little kept to rebuild it without its spec: nothing to contradict
        kept = {}
    args = spec.get("args") if isinstance(spec.get("args"), dict) else {}
    if differ := sorted(k for k in kept.keys() & args.keys() if args[k] != kept[k]):
        raise ValueError(f"{src.path}: its model_spec's {differ[0]} {args[differ[0]]!r} differs from the "
                         f"{kept[differ[0]]!r} its settings and categories give --eval-only; delete the one it was not "
                         f"trained with")
    return spec


class DenseReader(Reader):
    """A ``lomar detect`` or ``lomar segment`` checkpoint (``format`` lomar-detect-1, ``task`` segment)."""

    name = "lomar-dense"

    def detect(self, data, state):
        return run_command(data) in DENSE_ARCH

    def model(self, src, overrides):
        spec = dense_spec(src)
        refuse_unused(src.path, f"a `lomar {run_command(src.data)}` model, which carries its own settings", overrides,
                      saved=spec_settings(spec))
        return build_strict(spec, src.state, src.path)

    def encoder(self, src, overrides):
        raise whole_model_refusal(src.path, src.data)


# Before our pretraining and ViT readers: the file says which command wrote it.
register(DenseReader(), 8)
