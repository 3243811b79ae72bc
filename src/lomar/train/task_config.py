"""A training command's settings: :class:`TaskConfig`, the run-control settings every command shares and the
resolution of a command's settings (recipe defaults, YAML, flags, or the resumed run's saved settings), which each
command's config subclasses (:mod:`.config`, :mod:`.finetune_config`, :mod:`.detect_config`, :mod:`.segment_config`).
What a resume may change and which checkpoint ``--resume`` names: :mod:`.settings_resume`. Imports no torch."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lomar.checkpoints.file_names import BEST, LAST
from lomar.checkpoints.kinds import run_command
from lomar.errors import first_on_machine
from lomar.train import settings as S
from lomar.train.encoder_settings import REBUILT_FROM_CHECKPOINT, names_recorded_encoder, saved_encoder_config
from lomar.train.process_count import processes_of
from lomar.train.runtime import default_workers
from lomar.train.setting_flags import add_settings
from lomar.train.setting_names import setting_of, source_of
from lomar.train.settings import ConfigError, coerce_all, declarations, shown
from lomar.train.settings_resume import resume_target, resume_values
from lomar.values import command_line

if TYPE_CHECKING:  # torch: not at import
    from lomar.train.run_resume import ResumePoint

__all__ = ["TaskConfig", "SavedRun", "check_recorded_invocation", "absolute_paths", "check_flex_device"]


@dataclasses.dataclass
class TaskConfig:
    """A training command's settings: a subclass's own fields (``COMMAND`` its name), then the run control
    below (--help and the dumps list it last: :func:`~lomar.train.settings.declarations`), and their
    resolution (:meth:`resolve`), whose steps a command may override; ``out`` defaults to runs/<timestamp>."""

    COMMAND = "task"
    TRAINS_FROM_OWN = False  # --pretrained may be this command's own checkpoint, to train further from
    resume_point = None  # not a setting: what :meth:`resolve` read of the checkpoint resumed (run_resume.ResumePoint)
    # not a setting: whether --resume auto finding nothing says a new run starts; a study, which passes --resume auto
    # to each cell's run itself, sets it False: a cell's first start is no news there
    notes_new_run = True
    precision: str = S.PRECISION.field()
    workers: int | None = S.WORKERS.field()
    threads: int | None = S.THREADS.field()
    seed: int = S.SEED.field()
    device: str = S.DEVICE.field()
    log_every: int = S.LOG_EVERY.field()
    time_limit: int | None = S.TIME_LIMIT.field()
    resume: str | None = S.RESUME.field()
    overwrite: bool = S.OVERWRITE.field()

    def to_dict(self, record: bool = False) -> dict[str, Any]:
        """The settings by name; ``record``: as config.yaml keeps them, the per-invocation ones (--resume,
        --overwrite) at their defaults, so that the file given back as --config neither resumes nor overwrites."""
        values = dataclasses.asdict(self)
        return {name: s.default if record and s.resume == "per-invocation" else values[name]
                for name, s in declarations(type(self)).items()}

    def dump(self, invocation: bool = False) -> str:
        """YAML of :meth:`to_dict` as config.yaml holds it; ``invocation``: with --resume, --overwrite too."""
        return yaml.safe_dump(self.to_dict(record=not invocation), sort_keys=False)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_settings(parser, declarations(cls), config=True)

    @classmethod
    def resolve(cls, args: argparse.Namespace) -> TaskConfig:
        """Recipe defaults, YAML, flags (or the resumed run's saved settings) -> a validated config."""
        # the settings the user gave: the YAML file's, then the flags' on top
        if getattr(args, "config", None) == "":  # an unset shell variable: not "no config" (the defaults would run)
            raise ConfigError("--config must be non-empty, got ''; pass a YAML file of settings, or drop --config")
        explicit = S.read_yaml(cls, Path(args.config)) if getattr(args, "config", None) else {}
        flags = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}
        check_recorded_invocation(cls, explicit, getattr(args, "config", None), flags)
        in_file = {name: args.config for name in explicit.keys() - flags.keys()}  # to name where a setting came from
        explicit.update(flags)
        explicit.update(absolute_paths(cls, explicit))
        if str(explicit.get("out")).startswith("~"):  # as --data's (and a study's out:): not a folder named ~ here
            explicit["out"] = str(Path(explicit["out"]).expanduser())
        saved = cls.saved_run(explicit)
        values = cls.start_values(explicit, in_file, saved)
        if values.get("out") is None:
            values["out"] = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        config = cls(**values)
        config.resume_point, config.in_file = (saved.point if saved is not None else None), in_file
        # where the resumed run was set to end: a resume that ends it sooner stops inside the lr schedule laid for that
        # end (schedule_steps is fixed, epochs and max_steps run-control), which the start says (run_lines.announce)
        config.resumed_end = {k: saved.settings.get(k) for k in ("epochs", "max_steps")} if saved is not None else None
        config.flags_given = frozenset(flags)  # what the command line gave, not a settings file
        config.complete(explicit)
        if config.workers is None:
            config.workers = default_workers()
        # --print-config only shows the settings, so an --out that holds a run is no error there
        config.validate(check_out=not getattr(args, "print_config", False))
        return config

    @classmethod
    def start_values(cls, explicit: dict[str, Any], in_file: dict[str, str] | None,
                     saved: SavedRun | None) -> dict[str, Any]:
        """The settings before :meth:`complete`: ``explicit`` (YAML's, flags') over the resumed run's (``saved``), or
        over :meth:`fresh_values`, the schedule laid over a new ``--max-steps``. ``in_file``: YAML file by setting."""
        if saved is not None:
            meta = saved.point.meta if saved.point else None
            held = {"pretrained": REBUILT_FROM_CHECKPOINT} if saved_encoder_config(cls.COMMAND, meta) else None
            run = saved.settings
            if held and names_recorded_encoder(explicit.get("pretrained"), run.get("pretrained"),
                                               explicit.get("out"), run.get("out")):  # its record keeps the path
                explicit = {**explicit, "pretrained": run["pretrained"]}
            return resume_values(cls, saved.settings, saved.source, explicit, in_file, processes_of(meta), held)
        values = cls.fresh_values(explicit)
        if values.get("max_steps") and "epochs" not in explicit and "schedule_steps" not in explicit:
            # the lr schedule spans the steps that will run: a short run warms up and anneals instead of stopping
            # inside the recipe's warm-up (a resumed run keeps the schedule it started with)
            values["schedule_steps"] = values["max_steps"]
        return values

    @classmethod
    def fresh_values(cls, explicit: dict[str, Any]) -> dict[str, Any]:
        """A new run's settings: ``explicit`` over the declared defaults."""
        return {**dataclasses.asdict(cls()), **explicit}

    @classmethod
    def saved_run(cls, explicit: dict[str, Any]) -> SavedRun | None:
        """The :class:`SavedRun` of the checkpoint ``--resume`` names (its settings: :meth:`saved_settings`), or None
        for a new run; a command with ``--fsdp`` may name a sharded folder (its meta.pt). It resumes into its folder."""
        point = resume_target(explicit, sharded_ok="fsdp" in cls.__dataclass_fields__)
        if point is None:
            return None
        path, checkpoint = point.path, point.meta
        command = run_command(checkpoint)
        if command not in (None, cls.COMMAND):
            raise ConfigError(f"--resume {path} is a `lomar {command}` checkpoint, not a `lomar {cls.COMMAND}` one; "
                              f"resume it with `lomar {command}`, or start a new run with another --out")
        settings = cls.saved_settings(checkpoint, path)
        if command == cls.COMMAND and "optimizer" not in checkpoint and not path.is_dir():  # its run's best.pt
            last = path.parent / LAST
            uses = ([f"continue its run with {command_line('--resume', last)}"] * (last.is_file() and last != path)
                    + [f"start a new run from it with {command_line('--pretrained', path)}"] * cls.TRAINS_FROM_OWN
                    + [f"score it with {command_line('--eval-only', '--pretrained', path)}"]
                    * ("eval_only" in cls.__dataclass_fields__))
            raise ConfigError(f"--resume {path} holds a `lomar {cls.COMMAND}` model without its run's state (optimizer,"
                              f" step, RNG: {BEST} keeps the best evaluation's weights alone); " + ", or ".join(uses))
        if not isinstance(settings, dict):
            raise ConfigError(f"--resume {path} is not a `lomar {cls.COMMAND}` checkpoint; to start from "
                              f"pretrained weights pass them as --pretrained")
        saved = coerce_all(cls, settings, str(path), strict=False)
        if "out" not in explicit:
            saved["out"] = str(path.parent)
        return SavedRun(saved, str(path), point)

    @staticmethod
    def saved_settings(checkpoint: dict, path: Path) -> dict | None:
        """The settings a checkpoint of this command saved (read from ``path``); None for another file."""
        return None

    def complete(self, explicit: dict[str, Any]) -> None:
        """Fill in what the settings imply (``explicit``: the settings the user gave)."""

    def validate(self, check_out: bool = True) -> None:
        """Everything that can be checked before any work; raises ConfigError naming the fix.
        ``check_out``: also the inputs and the output folder (--print-config shows the settings only)."""
        for name, declared in declarations(type(self)).items():  # YAML values included
            declared.check(name, getattr(self, name))
        self.check_settings()
        if not check_out:
            self.print_notes()
            return
        self.check_inputs()
        if getattr(self, "attention", None) == "flex" and not getattr(self, "eval_only", False):
            check_flex_device(self.device)
        from lomar.train.run_state import check_out_folder, inside, refuse_held_run  # torch: not for --help

        check_out_folder(Path(self.out), setting_of(self, "out"))  # out: r1 in my.yaml, not --out r1
        for name, data in ((n, getattr(self, n, None)) for n in ("data", "val", "train_images", "val_images")):
            if data and Path(data).is_dir() and inside(Path(self.out), Path(data)):
                raise ConfigError(f"{setting_of(self, 'out')} is inside {setting_of(self, name)}: the run's files "
                                  f"would join the data it reads; put the run elsewhere")
        refuse_held_run(Path(self.out), self.resume, self.overwrite, eval_only=getattr(self, "eval_only", False),
                        source=source_of(self, "out"))
        self.print_notes()

    def check_settings(self) -> None:
        """The checks of the settings alone."""

    def notes(self) -> list[str]:
        """What a valid run should still be told (a setting it leaves unused), once every check has passed."""
        return []

    def print_notes(self) -> None:
        """On stderr; under torchrun by the first process of each machine only (each would print the same)."""
        for note in self.notes() if first_on_machine() else ():
            print(f"lomar {self.COMMAND}: note: {note}", file=sys.stderr)

    def check_inputs(self) -> None:
        """The checks of the data and files named (not made for --print-config)."""


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """:meth:`TaskConfig.saved_run`'s: the run's ``settings``, read from ``source`` (its checkpoint or config.yaml), and
    ``point``, the checkpoint as read (:class:`~lomar.train.run_resume.ResumePoint`; None for a config.yaml)."""

    settings: dict[str, Any]
    source: str
    point: ResumePoint | None = None


def check_recorded_invocation(cls: type, in_file: dict[str, Any], path: str | None, flags: dict[str, Any]) -> None:
    """Refuse a run's config.yaml written by a lomar that recorded the invocation's per-invocation settings (all
    before 5 Dec 2026), or --print-config's output of a resume: given back as --config, its ``overwrite: true``
    replaced the run held in the new --out and its ``resume: PATH`` branched off that checkpoint. Such a file holds
    every per-invocation setting and most others; a hand-written file's ``overwrite: true`` is the user's, applied."""
    declared = declarations(cls)
    per_invocation = [name for name, s in declared.items() if s.resume == "per-invocation"]
    if not set(per_invocation) <= in_file.keys() or len(in_file) < len(declared) // 2:
        return
    kept = [f"{name}: {str(value).lower() if isinstance(value := in_file[name], bool) else shown(value)}"
            for name in per_invocation if name not in flags and in_file[name] != declared[name].default]
    if kept:
        flags_named = " or ".join("--" + item.split(":")[0].replace("_", "-") for item in kept)
        raise ConfigError(f"{path} records an invocation's {' and '.join(kept)} (it is --print-config's output of "
                          f"one, or a run's config.yaml written by an older lomar): given back as --config, it would "
                          f"act on this --out (replace the run held there, or resume a run's checkpoint); delete "
                          f"{'those lines' if len(kept) > 1 else 'that line'} from it, and give {flags_named} on the "
                          f"command line when meant")


def absolute_paths(cls: type, given: dict[str, Any]) -> dict[str, str]:
    """``given``'s file and folder settings (declared ``path``) made absolute: the run records them so, and a
    resume started in another working folder reads the same files (and finds a path given again unchanged).
    An empty one is left to the "non-empty" check: it would name the working folder."""
    declared = declarations(cls)
    return {name: str(Path(value).expanduser().absolute()) for name, value in given.items()
            if name in declared and declared[name].path and isinstance(value, str) and value.strip()}


def check_flex_device(device: str) -> None:
    """FlexAttention trains on CUDA only (elsewhere it has no backward): say so before any data is read."""
    import torch  # not for --help

    if not (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
        where = "and this machine has none" if device == "auto" else f"not --device {device}"
        raise ConfigError(f"--attention flex needs a CUDA device to train, {where} (elsewhere FlexAttention has no "
                          f"backward); use --attention chunked or auto")
