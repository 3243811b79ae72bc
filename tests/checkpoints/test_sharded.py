"""Sharded (DCP) checkpoint folders are read without unpickling anything but DCP's own records."""

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.sharded import check_metadata, read_sharded
from lomar.errors import UsageError
from lomar.train.fsdp import load_sharded
from lomar.train.run_state import read_meta


class Touch:
    """Unpickling this creates ``marker``: what a crafted file would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


class Mkdir(Touch):
    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _save(directory: Path, state: dict) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(directory), no_dist=True)
    atomic_save({"step": 3, "epoch": 0, "batches_done": 3}, directory / "meta.pt")
    return directory


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def test_a_genuine_folder_is_read_and_resumed(tmp_path):
    model, optimizer = _model_and_optimizer()
    folder = _save(tmp_path / "checkpoint-000003.dcp", _state(model, optimizer))
    check_metadata(folder)
    state = read_sharded(folder)
    assert state["step"] == 3 and set(state["model"]) == {"weight", "bias"}
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5e-2)
    assert load_sharded(fresh, fresh_opt, folder)["step"] == 3
    torch.testing.assert_close(fresh.weight, model.weight)
    assert fresh_opt.param_groups[0]["lr"] == 1e-3  # the non-tensor entries come back too


@pytest.mark.parametrize("payload", [Touch, Mkdir])
def test_crafted_metadata_is_refused_before_anything_runs(tmp_path, payload):
    model, optimizer = _model_and_optimizer()
    folder = _save(tmp_path / "checkpoint-000003.dcp", _state(model, optimizer))
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(payload(marker)))
    for read in (read_sharded, read_meta, check_metadata):
        with pytest.raises(ValueError, match=r"never holds\); refusing to load it"):
            read(folder)
    with pytest.raises(UsageError, match="^--resume: .*refusing to load it") as info:
        load_sharded(*_model_and_optimizer(), folder)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_truncated_metadata_is_one_clear_error(tmp_path):
    folder = _save(tmp_path / "checkpoint-000003.dcp", _state(*_model_and_optimizer()))
    (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:40])
    with pytest.raises(ValueError, match="is not a sharded checkpoint's metadata"):
        read_sharded(folder)


@pytest.mark.parametrize("field, value", [("size", "abc"), ("size", (3, -4)), ("dtype", "float32"), ("chunks", None)])
def test_a_tensor_record_of_no_tensors_shape_or_dtype_is_one_line_not_a_traceback(tmp_path, field, value):
    """A record's shape and dtype become a tensor as the folder is read (DCP's planner) and as a command peeks at its
    encoder (sharded_outline): one that is no tensor's is refused as the metadata's in one line, for the read and for
    the peek at a command's start, not left to torch's TypeError and its traceback."""
    from lomar.checkpoints.peek import peek_encoder

    folder = _save(tmp_path / "checkpoint-000003.dcp", _state(*_model_and_optimizer()))
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    record = metadata.state_dict_metadata["model.weight"]
    setattr(record.properties if field == "dtype" else record, field, value)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"metadata \(its record 'model.weight' gives no tensor's shape, dtype and "
                                         r"chunks\); refusing to load it"):
        read_sharded(folder)
    assert peek_encoder(folder) is None


def test_a_crafted_non_tensor_entry_is_refused_on_resume(tmp_path):
    model, optimizer = _model_and_optimizer()
    state = _state(model, optimizer)
    marker = tmp_path / "ran"
    state["optimizer"]["param_groups"][0]["lr"] = Touch(marker)  # saved as a pickled bytes entry
    folder = _save(tmp_path / "checkpoint-000003.dcp", state)
    assert set(read_sharded(folder)["model"]) == {"weight", "bias"}  # the model alone: entry never read
    with pytest.raises(UsageError, match="'optimizer.param_groups.0.lr' is not plain data") as info:
        load_sharded(*_model_and_optimizer(), folder)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_a_resume_opens_the_metadata_once(tmp_path, monkeypatch):
    # the resume point's read_meta, load_sharded's check and DCP's reader (its check, then its own pickle.load)
    # opened .metadata 4 times in each process; a folder saved again (another file) is read anew
    import builtins
    import io

    folder = _save(tmp_path / "checkpoint-000003.dcp", _state(*_model_and_optimizer()))
    opened, real_open = [], builtins.open

    def counting(file, *args, **kwargs):
        opened.extend([file] if str(file).endswith(".metadata") else [])
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    monkeypatch.setattr(io, "open", counting)  # Path.open's, as DCP's file system opens it
    meta = read_meta(folder)
    assert load_sharded(*_model_and_optimizer(), folder, meta)["step"] == 3
    assert len(opened) == 1
    _save(folder, _state(*_model_and_optimizer()))  # rewritten: DCP replaces .metadata
    assert load_sharded(*_model_and_optimizer(), folder)["step"] == 3
    assert len(opened) == 2


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A folder as save_sharded writes it, one data file (one process), built once: each test damages a copy."""
    return _save(tmp_path_factory.mktemp("sharded") / "checkpoint-000003.dcp", _state(*_model_and_optimizer()))


def _damage(how: str, file: Path) -> None:
    data = file.read_bytes()
    if how == "cut short":
        file.write_bytes(data[:len(data) // 2])
    elif how == "bytes changed":
        file.write_bytes(bytes(b ^ 0xFF for b in data))
    elif how == "empty":
        file.write_bytes(b"")
    else:
        file.unlink()
        if how == "a folder":
            file.mkdir()


DAMAGE = ["cut short", "bytes changed", "missing", "a folder", "empty"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_data_file_is_one_line_naming_it(tmp_path, genuine, how, capsys):
    # each read ended in DCP's traceback (EOFError, UnpicklingError, FileNotFoundError, IsADirectoryError), wrapped
    # in a CheckpointException that no caller caught: --resume, lomar export, load_model, the consolidate command
    from lomar.train.fsdp import _main as fsdp_cli

    folder = tmp_path / genuine.name
    shutil.copytree(genuine, folder)
    [data_file] = folder.glob("*.distcp")
    _damage(how, data_file)
    said = f"{data_file} is damaged ("
    fix = "restore the file from a copy, or use another checkpoint-NNNNNN.dcp folder of the run"
    with pytest.raises(ValueError) as info:
        read_sharded(folder)
    assert str(info.value).startswith(said) and fix in str(info.value)
    with pytest.raises(UsageError, match="^--resume") as info:
        load_sharded(*_model_and_optimizer(), folder)
    assert said in str(info.value) and "\n" not in str(info.value)
    if how == "bytes changed":  # only a read of its records tells: the resume's choice of checkpoint reads none
        assert read_meta(folder)["step"] == 3
    else:  # told before DCP reads: --resume auto passes such a folder over (test_resume_damaged)
        with pytest.raises(ValueError, match=re.escape(said)):
            read_meta(folder)
    capsys.readouterr()
    assert fsdp_cli(["consolidate", str(folder), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m lomar.train.fsdp consolidate: error: {said}") and err.count("\n") == 1
    assert not (tmp_path / "out.pt").exists()


def test_the_consolidate_command_says_what_it_wrote_as_the_command_typed(tmp_path, genuine, capsys):
    # every lomar command's lines begin with the command ('lomar export: ...'), this one's too, not a bare 'lomar:'
    from lomar.train.fsdp import _main as fsdp_cli

    assert fsdp_cli(["consolidate", str(genuine), str(tmp_path / "out.pt")]) == 0
    assert capsys.readouterr().out == f"python -m lomar.train.fsdp consolidate: wrote {tmp_path / 'out.pt'}\n"


def test_a_read_of_the_model_alone_needs_only_its_records(tmp_path, genuine):
    # export and load_model read the model's records: a data file cut after them still gives the model
    folder = tmp_path / genuine.name
    shutil.copytree(genuine, folder)
    [data_file] = folder.glob("*.distcp")
    model = read_sharded(genuine)["model"]
    import torch.distributed.checkpoint as dcp

    records = dcp.FileSystemReader(str(genuine)).read_metadata().storage_data  # DCP's own: where each record lies

    def end(entry: str) -> int:
        return max(s.offset + s.length for index, s in records.items() if index.fqn.split(".")[0] == entry)

    assert end("optimizer") > end("model")  # the optimizer's records come after the model's
    with open(data_file, "r+b") as handle:
        handle.truncate(end("model"))
    torch.testing.assert_close(read_sharded(folder)["model"], model)
    with pytest.raises(UsageError, match="cut short"):
        load_sharded(*_model_and_optimizer(), folder)


@pytest.mark.parametrize("fill", [0x00, 0xFF])
def test_a_non_tensor_entry_whose_bytes_changed_is_damage_not_a_crafted_entry(tmp_path, genuine, fill):
    # DCP writes the non-tensor entries (the optimizer's param_groups) first in each data file: a file zeroed over
    # its length was said to hold an entry 'that would call code', naming neither the file nor a fix
    from lomar.checkpoints.sharded import _MetadataUnpickler

    folder = tmp_path / genuine.name
    shutil.copytree(genuine, folder)
    [data_file] = folder.glob("*.distcp")
    with open(folder / ".metadata", "rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    data = bytearray(data_file.read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith("optimizer.param_groups"):
            data[info.offset:info.offset + info.length] = bytes([fill]) * info.length
    data_file.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=re.escape(f"{data_file} is damaged (its records do not load")):
        load_sharded(*_model_and_optimizer(), folder)
