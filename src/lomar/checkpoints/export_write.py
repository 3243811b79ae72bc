"""An export's two files written as one change: the safetensors weights and config.json swapped in together under
the folder's lock (:func:`export_leftovers.export_lock`), so that a reader never finds new weights beside an old
config.json; and the export folder a weights file goes with, which its reader reads instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save

from lomar.checkpoints.export_leftovers import export_lock, stale_leftovers, writer_tag
from lomar.checkpoints.file_names import CONFIG_NAME, ENCODER_WEIGHTS, FITTED_TOKENIZER, RUN_ENCODER
from lomar.checkpoints.io import atomic_write_bytes, write_error

__all__ = ["write_export", "export_folder_of"]

def write_export(out: Path, weights_name: str, state: dict, config: dict) -> Path:
    """Write ``state`` as safetensors and ``config`` as config.json into ``out`` as one change: a reader finds the
    old export, the new one or (after a kill in the instant between) no config.json, never new weights beside the old
    config.json (a window size it would build them with). Both are written in full under temporary names first; the
    old pair is set aside, config.json first (no reader takes a folder without it for an export), the new pair
    renamed in, config.json last. On a failure the old pair goes back and no temporary file stays. Weights of another
    name that the replaced config.json named are removed once the new pair is in: read directly, they would be taken
    without the config (a ViTDet window size) they go with, as are the leftovers of an export killed midway.

    The swap is of the two files, not of the folder: a run's folder holds its checkpoints beside its export. Exports
    into one folder take turns: the write and swap hold its lock (:func:`export_leftovers.export_lock`)."""
    if out.exists() and not out.is_dir():  # making it a folder would fail with "[Errno 17] File exists"
        raise NotADirectoryError(f"{out} is a file, not a folder: an export is a folder (config.json + weights); "
                                 f"pass a folder path")
    # no safetensors metadata: its keys are written in hash order, which differs between processes, and an export's
    # bytes are the same for the same weights (a checksum of released weights, a two-process run's export compared)
    contents = {weights_name: save(state), CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode("utf-8")}
    with export_lock(out) as locked:
        tag = writer_tag()  # this writer's own names: another's, of the same PID on another machine, stay apart
        new = {name: out / f".{name}.new-{tag}" for name in contents}
        old = {name: out / f".{name}.old-{tag}" for name in contents}
        aside, weights_in, previous = [], False, _previous_weights(out, weights_name)
        try:
            for name, data in contents.items():
                try:
                    atomic_write_bytes(new[name], data)
                except OSError as exc:  # named as the file the caller asked for, not its temporary
                    raise (write_error(exc, out / name) or exc) from exc
            for name in (CONFIG_NAME, weights_name):
                if (out / name).exists():
                    os.replace(out / name, old[name])
                    aside.append(name)
            os.replace(new[weights_name], out / weights_name)
            weights_in = True
            os.replace(new[CONFIG_NAME], out / CONFIG_NAME)
        except BaseException:
            if weights_in and weights_name not in aside:  # no file of that name was there before
                (out / weights_name).unlink(missing_ok=True)
            # weights before config.json: the old config.json back beside the new weights would be the mix this
            # prevents; a failure to put one back leaves it (and config.json) at its .old name, not deleted
            for name in reversed(aside):
                os.replace(old[name], out / name)
            raise
        finally:
            for path in new.values():
                path.unlink(missing_ok=True)
        for path in (*old.values(), *previous, *(path for path, _ in stale_leftovers(out, locked))):
            path.unlink(missing_ok=True)
    return out


def _previous_weights(out: Path, weights_name: str) -> list[Path]:
    """The weights file of another name than ``weights_name`` that ``out``'s config.json names (its ``weights``), if
    any. Only a safetensors file of an export's name: a hand-edited config.json never takes a checkpoint with it."""
    try:
        name = json.loads((out / CONFIG_NAME).read_text()).get("weights")
    except (OSError, ValueError, RecursionError, AttributeError):  # no export there, or not one of ours
        return []
    named = isinstance(name, str) and Path(name).name == name and name.endswith(".safetensors")
    return [out / name] if named and name not in (weights_name, FITTED_TOKENIZER) and (out / name).is_file() else []


def export_folder_of(path: Path) -> Path | None:
    """The export folder whose config.json names the file ``path`` as its weights, else None. Read alone, such a
    file loses what only config.json says (the image size an RPE encoder was trained at, its ViTDet windows), and
    a BEiT export's weights are in no checkpoint format."""
    config = path.parent / CONFIG_NAME
    if path.suffix != ".safetensors" or not path.is_file() or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, RecursionError):  # not an export's: the file is read on its own
        return None
    if not isinstance(data, dict):
        return None
    beit = data.get("method") == "beit"
    if not beit and not str(data.get("architecture", "")).startswith("lomar_"):
        return None
    return path.parent if data.get("weights", RUN_ENCODER if beit else ENCODER_WEIGHTS) == path.name else None
