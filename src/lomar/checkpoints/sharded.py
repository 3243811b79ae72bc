"""A sharded checkpoint folder (``lomar pretrain --fsdp``, written by torch.distributed.checkpoint)
read back as the single-file form, in one process and without a process group; and the safe
reader and load planner every DCP load goes through.

torch's ``FileSystemReader`` unpickles ``.metadata`` with plain :mod:`pickle`, and its load planner
reads non-tensor entries with ``torch.load(weights_only=False)``: a crafted folder would run code
on ``lomar export`` or ``--resume``. Here the metadata is first rebuilt by an unpickler that only
knows DCP's record classes, and each non-tensor entry is first loaded with ``weights_only=True``;
anything else is refused before the stock code sees it.

A data file (``*.distcp``) cut short, emptied, removed or replaced by a folder is named before DCP reads it (its
metadata tells how far each record reaches), and one whose records do not load (bytes changed) as DCP reads it: its
read failed with the torch traceback of each rank.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import pickletools
import stat
import zipfile
from pathlib import Path

import torch

from lomar.checkpoints.io import atomic_save, safe_load
from lomar.checkpoints.kinds import PRETRAIN_FORMAT
from lomar.data.shard_members import file_identity

__all__ = ["read_sharded", "sharded_outline", "consolidate", "check_metadata", "refusal", "safe_reader", "safe_planner"]

_RECORD_MODULE = "torch.distributed.checkpoint.metadata"  # Metadata, TensorStorageMetadata, ...: plain records
_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
            ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
_PATHS = ({"pathlib", "pathlib._local"}, {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"})
_CHECKED: dict[str, tuple[tuple, bytes, dict]] = {}  # a .metadata file -> (its file_identity, its bytes, _reach)
_KEEP = 4  # files kept checked: a resume's candidates (--resume auto reads last's, then newer folders')


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if _allowed(module, name) else None
        if module == _RECORD_MODULE and not (isinstance(found, type) and found.__module__ == module):
            found = None  # a class of its own, not what it imports (Enum, Sequence, ...)
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which checkpoint metadata never holds")
        return found


def _allowed(module: str, name: str) -> bool:
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return module == _RECORD_MODULE or (module, name) in _GLOBALS or (module in _PATHS[0] and name in _PATHS[1])


def check_metadata(directory: str | Path, keys: tuple[str, ...] | None = None) -> None:
    """Raise ValueError unless every ``*.metadata`` file of ``directory`` unpickles from DCP's own
    record classes alone (nothing is called but their constructors), and each data file its records of ``keys`` (the
    state's top-level entries, "model" or "optimizer"; None: all) are in is a file there, long enough to hold them."""
    for path in sorted(p for p in Path(directory).iterdir() if p.name.endswith(".metadata")):
        reach = _checked(path)[1]
        needed: dict[str, int] = {}
        for key in reach if keys is None else keys:
            for name, end in reach.get(key, {}).items():
                needed[name] = max(end, needed.get(name, 0))
        for name, end in sorted(needed.items()):
            _check_data_file(Path(directory), name, end)


def _check_data_file(directory: Path, name: str, end: int) -> None:
    path = directory / name
    try:
        mode, size = (info := path.stat()).st_mode, info.st_size
    except OSError as exc:
        raise ValueError(_damaged(path, "missing" if isinstance(exc, FileNotFoundError) else
                                 f"cannot be read: {exc.strerror}")) from None
    if not stat.S_ISREG(mode):
        raise ValueError(_damaged(path, "a folder, not a file" if stat.S_ISDIR(mode) else "not a file"))
    if size < end:
        raise ValueError(_damaged(path, f"{size} bytes, its records reach byte {end}: cut short" if size else
                                 f"empty, its records reach byte {end}"))


def _damaged(path: Path, why: str) -> str:
    """The one line for the data file ``path`` of a sharded checkpoint that cannot be read (``why``)."""
    return (f"{path} is damaged ({why}), so the sharded checkpoint {path.parent} cannot be read; restore the file "
            f"from a copy, or use another checkpoint-NNNNNN.dcp folder of the run")


def _reach(metadata) -> dict[str, dict[str, int]]:
    """For each top-level entry of the state ("model", "optimizer"), how far its records reach into each data file of
    the folder (by name)."""
    reach: dict[str, dict[str, int]] = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        name, end = info.relative_path, info.offset + info.length
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"it places a record in {name!r}, outside its folder")
        if not isinstance(end, int) or isinstance(end, bool) or end < 0:
            raise ValueError(f"it places a record at {end!r}, no place in a file")
        files = reach.setdefault(str(index.fqn).split(".")[0], {})
        files[name] = max(end, files.get(name, 0))
    return reach


def _check_records(metadata) -> None:
    """ValueError naming the first tensor record of ``metadata`` whose shape, dtype or chunks are no tensor's: DCP's
    load planner and :func:`sharded_outline` build tensors of them, which a crafted record would end in torch's
    traceback (a TypeError wrapped in DCP's exception) instead of a refusal."""
    records = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(records, dict):
        raise ValueError("it holds no table of records (state_dict_metadata)")
    for fqn, record in records.items():
        # a record without a size is a non-tensor entry, loaded with weights_only=True (safe_planner)
        if hasattr(record, "size") and not (isinstance(fqn, str) and _a_tensors(record)):
            raise ValueError(f"its record {fqn!r} gives no tensor's shape, dtype and chunks")


def _a_tensors(record) -> bool:
    """Whether the tensor record ``record`` gives a shape, a torch dtype, and a list of chunks each with offsets and
    sizes of that shape's rank."""
    shape = _sizes(record.size)
    if shape is None or not isinstance(getattr(getattr(record, "properties", None), "dtype", None), torch.dtype):
        return False
    chunks = getattr(record, "chunks", None)
    return isinstance(chunks, list) and all(_sizes(getattr(chunk, "offsets", None), len(shape)) is not None
                                            and _sizes(getattr(chunk, "sizes", None), len(shape)) is not None
                                            for chunk in chunks)


def _sizes(value, rank: int | None = None) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative ints (of ``rank`` of them where given), None where it is not one."""
    if not isinstance(value, tuple) or (rank is not None and len(value) != rank):
        return None
    return value if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) else None


def _checked(path: Path) -> tuple[bytes, dict[str, dict[str, int]]]:
    """The bytes of the metadata file ``path`` once they passed :func:`check_metadata`'s unpickler, and its
    :func:`_reach`. A resume checks
    the file as it picks its checkpoint, again before DCP's load, and DCP reads it: the file is read once while it
    is unchanged (its :func:`~lomar.data.shard_members.file_identity`, taken before the read, as it was)."""
    key, identity = os.path.abspath(path), file_identity(path)
    if identity is not None and (kept := _CHECKED.get(key)) is not None and kept[0] == identity:
        return kept[1], kept[2]
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        _check_records(metadata)
        reach = _reach(metadata)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ValueError(f"{path} is not a sharded checkpoint's metadata ({exc}); refusing to load it: "
                         f"pass a checkpoint-NNNNNN.dcp folder written by `lomar pretrain --fsdp`") from None
    _CHECKED.pop(key, None)
    while len(_CHECKED) >= _KEEP:
        del _CHECKED[next(iter(_CHECKED))]
    if identity is not None:
        _CHECKED[key] = (identity, data, reach)
    return data, reach


def _metadata(path: Path):
    """The metadata object of the file ``path``, rebuilt from its bytes checked by :func:`_checked` (not read again
    while unchanged) by the checking unpickler: a new object each call, which DCP's reader stamps with its load id."""
    return _MetadataUnpickler(io.BytesIO(_checked(path)[0])).load()


def _parses(value: io.BytesIO) -> bool:
    """Whether the non-tensor record ``value`` is a whole pickle (torch.save's archive's, or a bare one), which
    weights_only then refused for what it names; bytes that changed do not parse (a zip's CRC, pickle's opcodes)."""
    try:
        value.seek(0)
        if zipfile.is_zipfile(value):
            with zipfile.ZipFile(value) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        else:
            data = value.getvalue()
        for _ in pickletools.genops(data):
            pass
    except Exception:  # noqa: BLE001 - whatever the bytes make zipfile or pickletools raise: not a whole pickle
        return False
    return True


class _Refused(ValueError):
    """An entry refused as it loads (not plain data): said as it is, not as a damaged file."""


@functools.cache
def _classes() -> tuple[type, type, type]:
    # torch.distributed.checkpoint takes half a second to import: only when a sharded folder is read.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint.metadata import StorageMeta

    class NamingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            try:
                with super().create_stream(path, mode) as stream:
                    yield stream  # DCP loads every record of the file inside: their failures end up here
            except _Refused:
                raise
            except Exception as exc:  # anything a record of changed bytes makes torch.load raise; its text is
                # torch's advice on weights_only or zip internals, not the user's
                raise ValueError(_damaged(Path(path), f"its records do not load: {type(exc).__name__}")) from None

    class SafeReader(FileSystemReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fs = NamingFileSystem()

        def read_metadata(self, *args, **kwargs):
            # every metadata file of the folder, as a lomar reader refuses the folder; its data files were checked
            # for the entries read (a read of the model alone needs no intact optimizer part)
            check_metadata(self.path, ())
            # the checked bytes, rebuilt by the checking unpickler: FileSystemReader's pickle.load would open the
            # file again; what it does after the load is done here alike
            metadata = _metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeBytes:
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                if not _parses(value):  # changed bytes, not a pickle: the file's reader names it damaged
                    raise
                raise _Refused(f"its entry {read_item.dest_index.fqn!r} is not plain data (it would call code "
                                 f"to unpickle); refusing to load it") from None
            value.seek(0)
            super().load_bytes(read_item, value)

    class SafePlanner(SafeBytes, DefaultLoadPlanner):
        pass

    class SafeEmptyPlanner(SafeBytes, _EmptyStateDictLoadPlanner):
        pass

    return SafeReader, SafePlanner, SafeEmptyPlanner


def safe_reader(directory: str | Path):
    """A ``FileSystemReader`` of ``directory`` that checks its metadata first (:func:`check_metadata`)."""
    return _classes()[0](str(directory))


def safe_planner():
    """A ``DefaultLoadPlanner`` whose non-tensor entries must load with ``weights_only=True``."""
    return _classes()[1]()


def read_sharded(sharded_dir: str | Path) -> dict:
    """``{"model", "step", "epoch", "config", "model_spec", "format", ...}`` of a ``checkpoint-N.dcp`` folder.

    The optimizer state is left out (exact resume uses the sharded folder); the result is what
    ``lomar export`` and evaluation read.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sharded_dir = _sharded(sharded_dir)
    from torch.distributed.checkpoint.api import CheckpointException

    check_metadata(sharded_dir, ("model",))  # here: a refusal inside DCP is logged with tracebacks, then wrapped
    # The model's tensors into memory, in this process alone: what torch's dcp_to_torch_save does,
    # without its intermediate file (whose failure on a full disk names no cause).
    full: dict = {}
    try:
        _load_state_dict(full, storage_reader=safe_reader(sharded_dir), planner=_classes()[2](keys={"model"}),
                         no_dist=True)
    except CheckpointException as exc:  # DCP wraps the error: a damaged data file's is the user's to fix
        raise refusal(exc) from None
    if not isinstance(full.get("model"), dict):
        raise ValueError(f"{sharded_dir} holds no model state; pass a checkpoint-NNNNNN.dcp folder of a "
                         f"`lomar pretrain --fsdp` run")
    return _with_meta(sharded_dir, {k: v.contiguous() for k, v in full["model"].items()})


def sharded_outline(sharded_dir: str | Path) -> dict:
    """:func:`read_sharded`'s dict with no record read: its ``model`` holds tensors on the meta device, of the shapes
    and dtypes its metadata gives, enough to tell its format and architecture. ValueError where the metadata does not
    pass :func:`check_metadata`, or there is no ``.metadata``."""
    sharded_dir = _sharded(sharded_dir)
    check_metadata(sharded_dir, ())
    metadata = _metadata(sharded_dir / ".metadata")
    model = {fqn.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype, device="meta")
             for fqn, entry in metadata.state_dict_metadata.items()
             if fqn.startswith("model.") and hasattr(entry, "size")}  # its tensors' records; bytes have no size
    return _with_meta(sharded_dir, model)


def _sharded(sharded_dir: str | Path) -> Path:
    """``sharded_dir`` as a Path; ValueError where it holds no ``.metadata``, so is no sharded checkpoint."""
    sharded_dir = Path(sharded_dir)
    if not (sharded_dir / ".metadata").exists():
        raise ValueError(f"{sharded_dir} is not a sharded checkpoint (no .metadata); pass a "
                         f"checkpoint-NNNNNN.dcp folder of a `lomar pretrain --fsdp` run")
    return sharded_dir


def _with_meta(sharded_dir: Path, model: dict) -> dict:
    """The single-file form of the sharded checkpoint ``sharded_dir`` whose model state is ``model``: its meta.pt's
    entries beside it, and a pretraining checkpoint's format where they name none."""
    meta = safe_load(sharded_dir / "meta.pt") if (sharded_dir / "meta.pt").exists() else {}
    state = {"model": model, **meta}
    state.setdefault("format", PRETRAIN_FORMAT)
    return state


def refusal(failure) -> BaseException:
    """The first ValueError (a refused entry, a damaged data file) among the errors a DCP ``CheckpointException``
    (``failure``) wraps, else ``failure`` itself."""
    return next((error for error, _ in failure.failures.values() if isinstance(error, ValueError)), failure)


def consolidate(sharded_dir: str | Path, out_file: str | Path) -> Path:
    """:func:`read_sharded`, written atomically to ``out_file``."""
    return atomic_save(read_sharded(sharded_dir), Path(out_file))
