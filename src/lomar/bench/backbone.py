"""``lomar bench --task backbone``'s child process: one variant's encoder built and timed here, forward + backward
at high resolution (:mod:`lomar.bench.backbone_plan`, the torch-free parent, plans the variants and starts one
process per variant: ``python -m lomar.bench.backbone SPEC_JSON``, whose last stdout line is the result's JSON)."""

from __future__ import annotations

import json
import sys

import torch

from lomar.bench.backbone_plan import ENCODERS, WINDOW, arch
from lomar.bench.host import peak_rss_bytes
from lomar.bench.report import machine_name
from lomar.bench.timing import DTYPES, resident_bytes, timed
from lomar.models.attention import vitdet_global_blocks
from lomar.models.vit import VisionTransformer, model_config

__all__ = ["run_variant"]


def run_variant(spec: dict) -> dict:
    """In this process: build the encoder, run warm-up and timed forward + backward steps."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    _, dim, depth, heads = arch(spec["model"], spec.get("tiny", False), spec.get("depth"))
    attention, windowing = spec["variant"], {}
    if attention == "windowed":
        attention, windowing = "auto", dict(window_size=WINDOW, global_blocks=vitdet_global_blocks(depth))
    pos, rel_pos = ENCODERS[spec.get("encoder", "lomar")]
    config = model_config(spec["model"], img_size=spec["img_size"], attention=attention, embed_dim=dim, depth=depth,
                          num_heads=heads, pos=pos, rel_pos=rel_pos, **windowing)
    torch.manual_seed(0)
    encoder = VisionTransformer(config).to(device).train()
    encoder.set_grad_checkpointing(spec["grad_checkpointing"])
    images = torch.randn(spec["batch_size"], 3, spec["img_size"], spec["img_size"], device=device)
    dtype = DTYPES[spec["precision"]]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = encoder.forward_features(images)
        out.float().square().mean().backward()
        encoder.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_bytes()
    for _ in range(spec["warmup"]):
        step()
    times = [timed(step, device) for _ in range(spec["steps"])]
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) - start_mem, "cuda_max_allocated_growth"
    elif (high := peak_rss_bytes()) is not None and start_mem is not None:  # the high-water mark over the start
        peak, kind = high - start_mem, "cpu_rss_growth"
    else:  # Windows: neither told
        peak, kind = None, None
    # runtime: what ran it, for the bench's meta (its parent imports no torch where --device cpu is given)
    return dict(step_times_s=times, peak_mem_bytes=peak if peak is None else int(peak), peak_mem_kind=kind,
                runtime=dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=machine_name(device)))


if __name__ == "__main__":  # the child process of lomar.bench.backbone_plan._child
    print(json.dumps(run_variant(json.loads(sys.argv[1]))), flush=True)
