"""FSDP2 on CPU with gloo (2 processes): same training as one process, exact resume from a
sharded checkpoint, and its consolidation into the usual single file; a bf16 policy, and a sharded model that
returns no view for FSDP to warn of."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fsdp_ranks import DIM, STEPS, _assert_close, _model

from helpers import free_port
from lomar.checkpoints.io import safe_load
from lomar.models.masking import MaskingPlan, sample_plan
from lomar.models.vit import model_config


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
