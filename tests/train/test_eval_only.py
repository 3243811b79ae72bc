"""lomar.train.eval_only: --eval-only's scoring (score_only) outside a training run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lomar.errors import UsageError
from lomar.train import eval_only
from lomar.train.runtime import default_threads


class _Scored:
    name, outputs = "finetune", ()

    def __init__(self, config, info, device):
        self.source = {"checkpoint": config.pretrained, "step": 1}

    def evaluate(self):
        return {"top1": 0.5}

    def finish(self, out):
        pass


@pytest.mark.parametrize("threads", [3, None])
def test_eval_only_takes_threads_as_a_run_does(tmp_path, monkeypatch, threads):
    """--eval-only left --threads unread (and a run's default share of the cores): torch's own count scored."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    config = SimpleNamespace(device="cpu", seed=0, out=str(tmp_path / "scored"), pretrained="ft/best.pt", img_size=32,
                             threads=threads)
    _, metrics, out = eval_only.score_only(config, _Scored)
    assert calls == [threads or default_threads()] and metrics == {"top1": 0.5}
    assert json.loads((out / "metrics.jsonl").read_text())["top1"] == 0.5


def test_eval_only_on_a_device_it_cannot_use_is_a_one_line_error(tmp_path, monkeypatch):
    """--eval-only --device cuda on a machine without CUDA raised init_distributed's ValueError, which the command
    does not catch (a traceback); a run says the same in one line (a UsageError, exit 2), as --eval-only now does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = SimpleNamespace(device="cuda", seed=0, out=str(tmp_path / "scored"), pretrained="ft/best.pt", img_size=32,
                             threads=1)
    with pytest.raises(UsageError, match="^--device cuda asked for CUDA but none is available"):
        eval_only.score_only(config, _Scored)
    assert not (tmp_path / "scored").exists()  # refused before the folder is locked


def test_eval_only_removes_the_temporaries_a_killed_one_left_in_its_outputs(tmp_path, capsys):
    class Segmented(_Scored):
        name, outputs = "segment", ("predictions",)

    out = tmp_path / "scored"
    (out / "predictions").mkdir(parents=True)
    half = out / "predictions" / f".val_00003.png.tmp-4242-{'0a' * 8}"  # atomic_write's name, its writer killed
    half.write_bytes(b"png")
    config = SimpleNamespace(device="cpu", seed=0, out=str(out), pretrained="seg/best.pt", img_size=32, threads=1)
    eval_only.score_only(config, Segmented)
    assert not half.exists()
    assert f"lomar segment: note: removed 1 stale temporary file(s) in {out}" in capsys.readouterr().err


def test_eval_only_leaves_the_hidden_temporaries_of_others_in_a_folder_it_shares(tmp_path, capsys):
    # --out may be any folder without a run (the working folder): a file there that the command writes none of is
    # not its killed write, whatever its name
    class Detected(_Scored):
        name, outputs = "detect", ("predictions.json",)

    out = tmp_path / "shared"
    out.mkdir()
    half = out / f".predictions.json.tmp-4242-{'0a' * 8}"
    others = [".notes.md.tmp", ".draft.tmp-4242", f".last.pt.tmp-4242-{'0a' * 8}"]
    for path in (half, *(out / name for name in others)):
        path.write_text("x")
    config = SimpleNamespace(device="cpu", seed=0, out=str(out), pretrained="det/best.pt", img_size=32, threads=1)
    eval_only.score_only(config, Detected)
    assert not half.exists() and all((out / name).exists() for name in others)


@pytest.mark.parametrize("local_world, visible, refused", [("2", 2, True), ("1", 2, False), ("2", 1, False)])
def test_a_gpu_index_that_every_process_of_a_machine_would_share_under_torchrun_is_a_one_line_error(
        monkeypatch, local_world, visible, refused):
    """--device cuda:0 under torchrun put every process of a machine on GPU 0, which NCCL refused at the first
    collective, in a traceback of every rank. One process a machine (another node's GPU), or one GPU shown to each
    process (a launcher's CUDA_VISIBLE_DEVICES), keeps its index; --device cuda is each process's LOCAL_RANK's GPU."""
    from lomar.train.distributed import DistInfo, join_group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: None)
    for name, value in {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": local_world}.items():
        monkeypatch.setenv(name, value)
    if visible == 1:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # the launcher's: this process's own GPU
    if refused:
        with pytest.raises(UsageError, match=r"^--device cuda:0 under torchrun: all 2 processes of this machine would "
                                             r"use GPU 0; pass --device cuda \(or auto\): each process takes its "
                                             r"LOCAL_RANK's GPU$"):
            join_group("cuda:0")
    else:
        assert join_group("cuda:0") == (DistInfo(1, 4, 1), torch.device("cuda", 0))
    # 'cuda' is the LOCAL_RANK's GPU where the process sees the machine's, else the one it is shown
    assert join_group("cuda") == (DistInfo(1, 4, 1), torch.device("cuda", 1 if visible > 1 else 0))
    if visible > 1:
        # the process's own index, as a wrapper passes each (--device cuda:$LOCAL_RANK), is 'cuda''s choice: not
        # refused
        assert join_group("cuda:1") == (DistInfo(1, 4, 1), torch.device("cuda", 1))


@pytest.mark.parametrize("visible, shown, expected", [(1, "5", 0), (4, "", 3), (1, "", None), (2, "0,1", None)])
def test_each_torchrun_process_takes_a_gpu_it_sees(monkeypatch, visible, shown, expected):
    """--device cuda (and auto) under torchrun took cuda:LOCAL_RANK whatever the process saw: where a launcher shows
    each process its own GPU alone (CUDA_VISIBLE_DEVICES, as SLURM's --gpus-per-task does), every process past the
    first asked for a GPU index it does not have ('invalid device ordinal'). Fewer GPUs than processes is a
    one-line refusal naming the fix; torch.cuda.set_device is given the GPU chosen."""
    from lomar.train.distributed import DistInfo, join_group

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: None)
    for name, value in {"WORLD_SIZE": "8", "RANK": "7", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                        "CUDA_VISIBLE_DEVICES": shown}.items():
        monkeypatch.setenv(name, value)
    for device in ("cuda", "auto"):
        if expected is None:
            with pytest.raises(UsageError, match=rf"^--device {device} under torchrun: LOCAL_RANK 3 but this process "
                                                 rf"sees {visible} GPU\(s\); start at most {visible} process\(es\) a "
                                                 rf"machine \(torchrun --nproc-per-node {visible}\), or show each its "
                                                 rf"own GPU \(CUDA_VISIBLE_DEVICES\)$"):
                join_group(device)
        else:
            assert join_group(device) == (DistInfo(7, 8, 3), torch.device("cuda", expected))
    assert chosen == ([] if expected is None else [torch.device("cuda", expected)] * 2)
