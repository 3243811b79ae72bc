"""`lomar pretrain --fsdp` in two gloo processes: the same run as one process, an exact resume and an export, what
it refuses, `lomar consolidate` of a folder that is not sharded, and --resume auto over sharded folders."""

from __future__ import annotations

import shutil

import pytest
import torch
from fsdp_ranks import _assert_close

from lomar.checkpoints.io import safe_load


def _pretrain_on_two_ranks(folder, *args: str, resume: bool = False) -> str:
    """``lomar pretrain`` in 2 processes of a gloo group (forked: the launcher is not what is tested here): the tiny
    settings, or (``resume``) only ``args``; what every process printed. ``folder`` gets each one's streams."""
    from helpers import TINY, as_torchrun

    ranks = as_torchrun(["pretrain", *([] if resume else TINY), *args], 2, folder, timeout=180)
    log = "".join(out + err for _, out, err in ranks)
    assert [code for code, _, _ in ranks] == [0, 0], log[-3000:]
    return log


@pytest.mark.slow
@pytest.mark.longest
def test_pretrain_fsdp_matches_one_process_resumes_exactly_and_exports(tmp_path, image_dir, capsys):
    from helpers import as_torchrun, losses
    from lomar.cli.app import main
    from lomar.train.fsdp import _main as fsdp_cli

    # 16 images, 2 ranks x batch 2 x accum 2: 2 optimizer steps per epoch; stops mid-epoch 1.
    common = ["--data", str(image_dir), "--batch-size", "2", "--accum-steps", "2", "--clip-grad", "1.0",
              "--save-every", "1", "--keep-last", "1", "--fsdp"]
    straight, resumed, single, one = (tmp_path / name for name in ("straight", "resumed", "single", "one"))
    log = _pretrain_on_two_ranks(tmp_path, *common, "--out", str(straight), "--max-steps", "3")
    assert "done at step 3" in log
    _pretrain_on_two_ranks(tmp_path, *common, "--out", str(resumed), "--max-steps", "1")
    shutil.copytree(resumed, one)  # resumed below on one process
    # a sharded folder named as --resume (--resume auto finds one through last.json: test_resume_auto_follows_...)
    log = _pretrain_on_two_ranks(tmp_path, "--resume", str(resumed / "checkpoint-000001.dcp"), "--max-steps", "3",
                                 resume=True)
    assert "resumed from" in log and "checkpoint-000001.dcp at step 1" in log

    assert losses(straight) == losses(resumed) and len(losses(resumed)) == 3
    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert a["step"] == b["step"] == 3 and "optimizer" not in a
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    # The same checkpoint resumed on one process (no torchrun), the global batch kept: DCP reads the model's and
    # AdamW's state, sharded over 2, onto 1. Losses as the 2-process run's up to the order of the gradient sums (a few
    # ulps; equal here, where AdamW's moments zeroed on load move step 3's by 1e-2), weights as in the check below.
    # Forked as the others: FSDP's backward in this process would leave autograd's threads to the later forks.
    [(code, out, err)] = as_torchrun(["pretrain", "--out", str(one), "--resume", "auto", "--max-steps", "3",
                                      "--batch-size", "4"], 1, tmp_path, timeout=180)
    assert code == 0, err[-3000:]
    assert "2 → 1 process(es) after step 1, the global batch kept (4 x accum 2 x 1 = 8), the FSDP model and " \
           "optimizer state resharded over 1: each step reads the same samples as on 2" in out + err
    assert losses(one) == pytest.approx(losses(straight), rel=1e-6, abs=0) and len(losses(one)) == 3
    _assert_close(safe_load(one / "last.pt")["model"], a["model"], atol=2e-6)
    for run in (straight, resumed, one):  # --keep-last 1 pruned the folders; last.json names the newest
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000003.dcp"]
        assert '"checkpoint-000003.dcp"' in (run / "last.json").read_text()

    # The same global batch in one unsharded process.
    args = [c for c in common if c != "--fsdp"]
    args[args.index("--batch-size") + 1] = "4"
    from helpers import pretrain

    assert pretrain(*args, "--out", str(single), "--max-steps", "3") == 0
    want = safe_load(single / "last.pt")["model"]
    _assert_close({k: v for k, v in a["model"].items()}, want, atol=2e-6)
    # compiled under FSDP (accumulation and clipping included): the same losses to float tolerance. FSDP's hooks run
    # outside the graphs (torch disables dynamo in them), so FSDP's own part is dynamo's and AOT autograd's trace
    # around them and its DTensor parameters: aot_eager's. Inductor's C++ kernels, built afresh in each rank (~100 s
    # of a loaded 2-core CPU, two thirds of this test), compile the model's own step, which
    # tests/train/test_pretrain.py's test_reduce_overhead_trains_as_eager_with_accumulation checks against eager
    torch._dynamo.reset()  # the forked processes compile afresh, whatever this one compiled before
    # config.patch, not monkeypatch: a config module keeps its values outside __dict__, so monkeypatch's undo deletes
    # the key (dynamo then hides it) and every later compile in this process fails
    with torch._dynamo.config.patch(debug_backend_override=">=0:aot_eager"):
        _pretrain_on_two_ranks(tmp_path, *common, "--compile", "--out", str(tmp_path / "compiled"), "--max-steps", "3")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(single), rel=1e-5)

    # last.pt, the .dcp folder itself, and the consolidation command all export the same encoder.
    assert main(["export", str(straight / "last.pt"), "--to", str(tmp_path / "e1")]) == 0
    assert main(["export", str(straight / "checkpoint-000003.dcp"), "--to", str(tmp_path / "e2")]) == 0
    assert fsdp_cli(["consolidate", str(straight / "checkpoint-000003.dcp"), str(tmp_path / "c.pt")]) == 0
    assert main(["export", str(tmp_path / "c.pt"), "--to", str(tmp_path / "e3")]) == 0
    weights = [(tmp_path / e / "model.safetensors").read_bytes() for e in ("e1", "e2", "e3")]
    assert weights[0] == weights[1] == weights[2]

    # The consolidated file holds no optimizer: resuming from it names what to pass instead.
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(straight / "last.pt"), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "consolidated model of an --fsdp run" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra, env_world, message", [
    ([], "1", "--fsdp shards the model across processes"),
    (["--precision", "fp16"], "2", "--precision fp16 is not supported with --fsdp"),
    (["--knn-every", "1"], "2", "--knn-every is not supported with --fsdp"),
])
def test_pretrain_fsdp_refuses_what_it_cannot_do(tmp_path, monkeypatch, capsys, extra, env_world, message):
    from helpers import pretrain

    monkeypatch.setenv("WORLD_SIZE", env_world)
    assert pretrain("--fsdp", *extra, "--out", str(tmp_path / "run"), "--print-config") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_consolidate_command_names_a_folder_that_is_not_sharded(tmp_path, capsys):
    from lomar.train.fsdp import _main as fsdp_cli

    assert fsdp_cli(["consolidate", str(tmp_path), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert "is not a sharded checkpoint" in err and "checkpoint-NNNNNN.dcp" in err and err.count("\n") == 1
    assert err.startswith("python -m lomar.train.fsdp consolidate: error: ")  # as typed, as 'lomar CMD: error:'
    assert not (tmp_path / "out.pt").exists()


def _fake_sharded(path, step: int, readable: bool = True):
    """A folder shaped like save_sharded's output (DCP metadata + meta.pt), without tensors."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    from lomar.checkpoints.io import atomic_save

    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={})))  # as DCP writes it
    if readable:
        atomic_save({"step": step, "config": {"fsdp": True}}, path / "meta.pt")
    else:
        (path / "meta.pt").write_bytes(b"cut short")
    return path


def test_resume_auto_follows_last_json_and_falls_back_to_the_newest_intact_folder(tmp_path):
    from lomar.train.run_lock import RunLock
    from lomar.train.run_resume import find_resume_point
    from lomar.train.run_state import checkpoints_to_prune, remove_stale_temporaries

    out = tmp_path / "run"
    for step in (2, 4):
        _fake_sharded(out / f"checkpoint-{step:06d}.dcp", step)
    _fake_sharded(out / "checkpoint-000006.dcp", 6, readable=False)
    (out / "last.json").write_text('{"checkpoint": "checkpoint-000004.dcp", "step": 4}\n')
    (out / "last.pt").write_bytes(b"a consolidated model, never resumed from")
    newer_unreadable = [f"{out / 'checkpoint-000006.dcp'} cannot be read, skipped"]
    found = find_resume_point(out)
    assert (found.path, found.notes) == (out / "checkpoint-000004.dcp", newer_unreadable)
    (out / "last.json").write_text('{"checkpoint": "checkpoint-000009.dcp", "step": 9}\n')  # gone
    found = find_resume_point(out)
    assert found.path == out / "checkpoint-000004.dcp"
    assert "names no intact checkpoint" in found.notes[0] and "checkpoint-000006.dcp cannot be read" in found.notes[1]
    pruned = checkpoints_to_prune(sorted(out.glob("checkpoint-*")), keep=1)
    assert [p.name for p in pruned] == ["checkpoint-000002.dcp", "checkpoint-000004.dcp"]
    _fake_sharded(out / "checkpoint-000008.dcp.tmp", 8)
    with RunLock(out):
        assert [p.name for p in remove_stale_temporaries(out)] == ["checkpoint-000008.dcp.tmp"]
    assert (out / "checkpoint-000004.dcp").is_dir() and not (out / "checkpoint-000008.dcp.tmp").exists()
