"""FSDP2 on CPU with gloo (2 processes): same training as one process, exact resume from a
sharded checkpoint, and its consolidation into the usual single file."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port
from lomar.checkpoints.io import safe_load
from lomar.models import LoMaR
from lomar.models.masking import MaskingPlan, sample_plan
from lomar.models.vit import model_config

DIM, STEPS = 32, 3


def _model() -> LoMaR:
    torch.manual_seed(0)
    return LoMaR(model_config("vit_tiny_patch8", img_size=32, embed_dim=DIM, depth=2, num_heads=2),
                 window_size=3, num_windows=2)


def _batches(rank: int | None = None, world: int = 1):
    """STEPS fixed batches of 4 images with their plans; a rank gets its contiguous share."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        images = torch.randn(4, 3, 32, 32, generator=gen)
        plan = sample_plan(4, (4, 4), 3, 2, 0.8, generator=gen)
        if rank is not None:
            part = slice(rank * 4 // world, (rank + 1) * 4 // world)
            images, plan = images[part], MaskingPlan(plan.top_left[part], plan.mask[part], plan.window_size)
        yield images, plan


def _step(model, optimizer, images, plan) -> None:
    loss, _, _ = model(images, plan=plan)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _full_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _worker(rank: int, world: int, port: int, out: str, precision: str) -> None:
    from lomar.checkpoints.sharded import consolidate
    from lomar.train.fsdp import load_sharded, save_sharded, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = shard_model(_model(), precision)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = list(_batches(rank, world))
        for i, (images, plan) in enumerate(batches):
            if i == STEPS - 1:
                save_sharded(model, optimizer, f"{out}/sharded", {"step": i, "config": {"precision": precision}})
            _step(model, optimizer, images, plan)
        straight = _full_state(model)
        # A fresh sharded model resumed from the checkpoint redoes the last step.
        resumed = shard_model(_model(), precision)
        resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
        meta = load_sharded(resumed, resumed_opt, f"{out}/sharded")
        _step(resumed, resumed_opt, *batches[meta["step"]])
        again = _full_state(resumed)
        if rank == 0:
            torch.save({"straight": straight, "resumed": again, "meta": meta}, f"{out}/result.pt")
            consolidate(f"{out}/sharded", f"{out}/consolidated.pt")
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # finished: skip the interpreter's teardown, which gloo's threads can abort (lomar.cli.app.run)


def _spawn(tmp_path, precision: str) -> dict:
    # forked: neither process imports torch, lomar and this module afresh, as spawned ones did (3-4 s)
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), precision), nprocs=2, start_method="fork")
    return torch.load(tmp_path / "result.pt", weights_only=True)


def _assert_close(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        other = got[key]
        if key.endswith("attn.qkv.bias"):  # the key bias: zero gradient, Adam-amplified rounding noise
            value, other = torch.cat([value[:DIM], value[2 * DIM:]]), torch.cat([other[:DIM], other[2 * DIM:]])
        torch.testing.assert_close(other, value, rtol=0, atol=atol, msg=key)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_resume_exactly_and_consolidate(tmp_path):
    result = _spawn(tmp_path, "fp32")
    reference = _model()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    states = []
    for images, plan in _batches():
        _step(reference, optimizer, images, plan)
        states.append({k: v.clone() for k, v in reference.state_dict().items()})
    _assert_close(result["straight"], states[-1], atol=2e-6)
    # Resuming from the sharded checkpoint is exact: same ranks, same reduction order.
    for key, value in result["straight"].items():
        assert torch.equal(result["resumed"][key], value), key
    assert result["meta"]["step"] == STEPS - 1
    single = safe_load(tmp_path / "consolidated.pt")
    assert single["step"] == STEPS - 1 and single["format"] == "lomar-pretrain-2"
    model = _model()
    model.load_state_dict(single["model"])  # strict: every key of the plain model, nothing else
    _assert_close(model.state_dict(), states[-2], atol=2e-6)


@pytest.mark.slow
def test_fsdp_bf16_policy_keeps_fp32_weights_and_trains(tmp_path):
    result = _spawn(tmp_path, "bf16")
    start = _model().state_dict()
    for key, value in result["straight"].items():
        assert value.dtype == torch.float32, key
    moved = [k for k, v in result["straight"].items() if not torch.equal(v, start[k])]
    assert len(moved) > len(start) // 2
    # bf16 compute: close to, but not the same as, the fp32 run.
    reference = _model()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for images, plan in _batches():
        _step(reference, optimizer, images, plan)
    weight = "encoder.blocks.0.mlp.fc1.weight"
    assert torch.allclose(result["straight"][weight], reference.state_dict()[weight], atol=2e-2)


def _full_disk_worker(rank: int, world: int, port: int, out: str, where: str) -> None:
    """Save once, then save again with a full disk hitting rank 1's shards or rank 0's meta.pt (or rank 1's
    shards meeting a folder gone read-only); each rank writes what the second save raised to ``out/rank<r>.txt``."""
    import contextlib
    import errno
    from unittest import mock

    from lomar.train.fsdp import save_sharded, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = shard_model(_model(), "fp32")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        save_sharded(model, optimizer, f"{out}/sharded", {"step": 0})
        if where == "shards" and rank == 1:
            def zip_writer_on_a_full_disk(*args, **kwargs):  # what torch.save inside DCP raised on a real one
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

            patch = mock.patch("torch.distributed.checkpoint.filesystem._write_item", zip_writer_on_a_full_disk)
        elif where == "read-only" and rank == 1:
            patch = mock.patch("torch.distributed.checkpoint.filesystem._write_item",
                               side_effect=OSError(errno.EROFS, "Read-only file system"))
        elif where == "meta" and rank == 0:
            patch = mock.patch("lomar.train.fsdp.atomic_save",
                               side_effect=OSError(errno.ENOSPC, "No space left on device"))
        else:
            patch = contextlib.nullcontext()
        with patch:
            try:
                save_sharded(model, optimizer, f"{out}/sharded", {"step": 1})
                raised = "nothing"
            except Exception as exc:  # noqa: BLE001 - the test records whatever came out
                raised = f"{type(exc).__name__}: {exc}"
        with open(f"{out}/rank{rank}.txt", "w") as f:
            f.write(raised)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["shards", "meta", "read-only"])
def test_a_full_disk_during_a_sharded_save_is_one_line_on_every_rank_and_keeps_the_last_checkpoint(tmp_path,
                                                                                                    where):
    # a folder gone read-only was DCP's multi-rank traceback, where the same on a single process is one line
    mp.start_processes(_full_disk_worker, args=(2, free_port(), str(tmp_path), where), nprocs=2,
                       start_method="fork")
    for rank in range(2):
        raised = (tmp_path / f"rank{rank}.txt").read_text()
        expected = "cannot write" if where == "read-only" else "no space left on the device to write"
        assert raised.startswith(f"SaveError: {expected} {tmp_path / 'sharded'}"), (rank, raised)
        assert "\n" not in raised and "resume with --resume auto" in raised
    assert not (tmp_path / "sharded.tmp").exists()  # the partial folder is gone
    from lomar.checkpoints.sharded import consolidate

    consolidate(tmp_path / "sharded", tmp_path / "single.pt")  # the first save is whole
    assert safe_load(tmp_path / "single.pt")["step"] == 0


# ---- `lomar pretrain --fsdp` ----------------------------------------------------------------
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


def test_a_sharded_model_returns_no_view_for_fsdp_to_warn_of(tmp_path):
    """MAE's prediction is a view (the cls token's row cut off): FSDP warned from every process at every launch
    that an in-place op on it would give wrong gradients. The copy keeps the loss and its gradients."""
    import warnings

    from lomar.models.mae import MAE
    from lomar.train.fsdp import shard_model

    def build():
        torch.manual_seed(0)
        return MAE(model_config("vit_tiny_patch8", img_size=32, embed_dim=DIM, depth=2, num_heads=2, pos="abs"),
                   decoder_embed_dim=DIM, decoder_depth=1, decoder_num_heads=2)

    images, noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.rand(2, 16)
    plain = build()
    plain(images, noise).loss.backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = shard_model(build())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = sharded(images, noise)
            out.loss.backward()
    finally:
        dist.destroy_process_group()
    assert [str(w.message) for w in seen if "view" in str(w.message)] == []
    assert out.pred._base is None and torch.equal(out.loss.detach(), plain(images, noise).loss.detach())
    grads = {name: None if p.grad is None else p.grad.full_tensor() for name, p in sharded.named_parameters()}
    for name, p in plain.named_parameters():
        assert (grads[name] is None) if p.grad is None else torch.equal(grads[name], p.grad), name


def test_a_sharded_save_over_a_full_quota_names_the_quota(tmp_path):
    # df shows the device's free space to a user whose quota is used up: "no space left on the device" misleads
    import errno

    from lomar.train.fsdp import _agree_on_failure
    from lomar.train.run_state import SaveError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for code, words in ((errno.EDQUOT, "no space left in the disk quota"),
                            (errno.ENOSPC, "no space left on the device")):
            with pytest.raises(SaveError) as info:
                _agree_on_failure(OSError(code, os.strerror(code)), tmp_path / "sharded", tmp_path / "sharded.tmp")
            assert str(info.value).startswith(f"{words} to write {tmp_path / 'sharded'}; ")
            assert info.value.errno == code
    finally:
        dist.destroy_process_group()
