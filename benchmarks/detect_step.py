"""Peak memory and time of one Mask R-CNN training step (forward + backward + AdamW) at a high
resolution on this machine, global vs ViTDet-windowed encoder blocks; each layout in its own process
so that its peak RSS is its own.

    PYTHONPATH=src python benchmarks/detect_step.py --size 1024 --model vit_tiny_patch16 [--device cuda]

Prints one JSON line per layout: peak RSS (GiB; the CUDA allocator's peak on a GPU), the step's seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_step(model_name: str, size: int, window: int, device: str, rois: int, attention: str) -> dict:
    import torch

    from lomar.integrations.detection import detector_param_groups
    from lomar.models.attention import vitdet_global_blocks
    from lomar.models.mask_rcnn import ViTMaskRCNN
    from lomar.models.vit import VisionTransformer, model_config
    from lomar.train.runtime import fast_adamw

    torch.manual_seed(0)
    depth = model_config(model_name).depth
    config = model_config(model_name, img_size=size, drop_path=0.1, window_size=window, attention=attention,
                          global_blocks=vitdet_global_blocks(depth) if window else ())
    model = ViTMaskRCNN(VisionTransformer(config), 80, size, rois_per_image=rois).to(device).train()
    optimizer = fast_adamw(detector_param_groups(model, 0.1, 0.7), lr=1e-4)
    image = torch.rand(3, size, size, device=device)
    masks = torch.zeros(8, size, size, dtype=torch.uint8, device=device)
    boxes = torch.tensor([[64.0 * i, 48.0 * i, 64.0 * i + 200, 48.0 * i + 150] for i in range(8)], device=device)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        mask[y1:y2, x1:x2] = 1
    target = {"boxes": boxes, "labels": torch.arange(1, 9, device=device), "masks": masks}
    seconds = []
    for _ in range(2):  # the first step warms up allocators and kernels; the second is timed
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tick = time.perf_counter()
        loss = sum(model([image], [target]).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - tick)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"model": model_name, "size": size, "layout": f"windowed {window} + global {config.global_blocks}"
            if window else "global", "device": device, "threads": torch.get_num_threads(), "rois_per_image": rois,
            "attention": attention, "step_s": round(seconds[-1], 2), "first_step_s": round(seconds[0], 2),
            ("peak_cuda_gib" if device.startswith("cuda") else "peak_rss_gib"): round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--model", default="vit_tiny_patch16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--windows", type=int, nargs="*", default=[0, 14], help="0 = global attention in every block")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_step(args.model, args.size, args.child, args.device, args.rois, args.attention)))
        return
    for window in args.windows:
        run = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--model", args.model, "--device",
                              args.device, "--rois", str(args.rois), "--attention", args.attention,
                              "--child", str(window)], capture_output=True, text=True)
        print(run.stdout.strip() or f"window {window}: failed: {run.stderr.strip().splitlines()[-1:]}", flush=True)


if __name__ == "__main__":
    main()
