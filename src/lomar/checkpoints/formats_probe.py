"""``lomar linprobe --save``'s file, registered with the other readers (:mod:`lomar.checkpoints.formats` asks them
all): a linear probe on the frozen encoder it was trained on, whose model spec rebuilds it whole
(:class:`~lomar.models.probe_classifier.ProbeClassifier`). A file of the probe alone (its ``probe`` state, ``pool``
and ``top1``, no ``model``) names no encoder, so nothing rebuilds it: it is refused naming the command that writes one
that is rebuilt."""

from __future__ import annotations

from pathlib import Path

from lomar.checkpoints.kinds import LINPROBE_FORMAT
from lomar.checkpoints.reader import Reader, Source, build_strict, refuse_unused, register, saved_spec, spec_settings

__all__ = ["LinprobeReader", "ProbeOnly", "probe_only_refusal"]

_ARCH = "lomar.models.probe_classifier:ProbeClassifier"


class ProbeOnly(ValueError):
    """The refusal of a file that holds a linear probe without its encoder: told apart from a file that cannot be
    read, so that a command refuses it while checking its settings (:func:`lomar.checkpoints.peek.peek_encoder`)."""


def probe_only_refusal(path: str | Path, data: dict) -> ProbeOnly | None:
    """The error for a file that holds a linear probe without its encoder (``data`` its contents), None for any
    other."""
    if "model" in data or not isinstance(data.get("probe"), dict) or "pool" not in data:
        return None
    return ProbeOnly(f"{path} holds a linear probe without the encoder it was trained on (its 'probe' state alone), "
                      f"which nothing rebuilds; run `lomar linprobe ENCODER --data DATA --save FILE` again, whose file "
                      f"keeps the encoder too, or put its 'probe' into lomar.models.probe_classifier.LinearProbe on "
                      f"that encoder's {data['pool']!r} features")


class LinprobeReader(Reader):
    """``lomar linprobe --save``'s file: ``{"format": "lomar-linprobe-1", "model", "model_spec", "classes", ...}``."""

    name = "lomar-linprobe"

    def detect(self, data, state):
        return data.get("format") == LINPROBE_FORMAT

    def model(self, src: Source, overrides: dict):
        spec = saved_spec(src, _ARCH, "it is a `lomar linprobe --save` file")
        refuse_unused(src.path, "a linear probe on its encoder, which carries its own settings", overrides,
                      saved=spec_settings(spec))
        return build_strict(spec, src.state, src.path)

    def encoder(self, src: Source, overrides: dict):
        pretrained = src.data.get("pretrained")
        raise ValueError(f"{src.path} is a linear probe on a frozen encoder; pass the encoder it probed"
                         + (f" ({pretrained})" if isinstance(pretrained, str) else ""))


# Before our pretraining reader: its weights are under encoder.* too
register(LinprobeReader(), 7)
