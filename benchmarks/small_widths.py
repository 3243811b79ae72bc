"""Why a narrow encoder's LoMaR step reaches a lower MFU on a CPU than MAE's: two measurements.

1. ``gemms``: the fp32 rate of the linear layers' products of each step (forward, gradient of the
   input, gradient of the weight, for qkv, proj, fc1, fc2), each timed alone, rounds interleaved,
   against a 2048³ ``torch.mm`` in the same rounds. A step's MFU is mostly its GEMM share times this
   rate; MAE's step at a small ``--model`` is 95-99 % its decoder (512 wide), LoMaR's its encoder.
2. ``irpe``: the LoMaR step with iRPE against the same step (same windows, mask, widths) without
   position (``pos='none'``: plain SDPA), interleaved in one process, CPU time of the process: what
   the contextual bias and the attention path it takes cost (SDPA's CPU math path: a bias that needs
   a gradient keeps the fused kernel off).

    python benchmarks/small_widths.py --threads 1 --json benchmarks/cpu-small-widths-1thread.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lomar.bench.host import load_average
from lomar.bench.report import machine_name
from lomar.bench.timing import GemmCeiling, build_runner, timed
from lomar.cli.common import write_json
from lomar.values import command_line

CPU = torch.device("cpu")

# name -> (tokens a step, width): LoMaR's windows x 50 tokens x batch; MAE's decoder: 1 + the grid, x batch
SHAPES = {
    "lomar demo (vit_mini_patch8 96 px, 3 windows, batch 16)": (2400, 128),
    "lomar vit_tiny_patch16 224 px 4 windows": (800, 192),
    "lomar vit_tiny_patch16 448 px 9 windows": (1800, 192),
    "lomar vit_small_patch16 448 px 9 windows": (1800, 384),
    "mae decoder 224 px (any --model)": (788, 512),
    "mae decoder 448 px (any --model)": (3140, 512),
    "lomar vit_base_patch16 448 px 9 windows": (1800, 768),
}
# (model, px, windows, batch) of the irpe comparison
STEPS = (("vit_mini_patch8", 96, 3, 16), ("vit_tiny_patch16", 224, 4, 4), ("vit_small_patch16", 224, 4, 4))


def linear_products(tokens: int, width: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every product of a block's four linear layers in one training step."""
    out = []
    for k, n in ((width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)):
        out += [(tokens, k, n), (tokens, n, k), (n, tokens, k)]
    return out


def gemm_rates(rounds: int, shapes: dict[str, tuple[int, int]] = SHAPES, ceiling: int = 2048,
               flops_per_sample: float = 2e8) -> dict:
    """GFLOP/s of each shape set's products (their FLOPs over their summed median times) and of the ceiling:
    :class:`~lomar.bench.timing.GemmCeiling`'s ``torch.mm`` of ``ceiling``³, the library these products run in,
    timed in every round. Each product is repeated to about ``flops_per_sample`` per timing."""
    sets = {name: linear_products(*size) for name, size in shapes.items()}
    mats = {s: (torch.randn(s[0], s[1]), torch.randn(s[1], s[2])) for products in sets.values() for s in products}
    times: dict[tuple[int, int, int], list[float]] = {s: [] for s in mats}
    gemm = GemmCeiling(CPU, "fp32", ceiling)
    for _ in range(rounds):
        gemm()
        for s, (a, b) in mats.items():
            reps = max(1, int(flops_per_sample // (2 * s[0] * s[1] * s[2])))
            torch.mm(a, b)
            times[s].append(timed(lambda a=a, b=b, reps=reps: [torch.mm(a, b) for _ in range(reps)], CPU) / reps)
    median = {s: statistics.median(t) for s, t in times.items()}
    rates = {name: sum(2 * m * k * n for m, k, n in products) / sum(median[s] for s in products) / 1e9
             for name, products in sets.items()}
    rates["ceiling"] = gemm.medians()["torch.mm"] / 1e9
    return {name: dict(gflops=rate, of_ceiling=rate / rates["ceiling"]) for name, rate in rates.items()}


def irpe_cost(model: str, px: int, windows: int, batch: int, rounds: int, tiny: bool = False) -> dict:
    """CPU seconds of a LoMaR step with iRPE and without position, interleaved; their ratio per round.
    ``tiny``: :func:`~lomar.bench.timing.build_runner`'s width-32, one-block model (tests only)."""
    runners = {pos: build_runner("lomar", model, px, windows, batch, CPU, "fp32", False, tiny=tiny, pos=pos)
               for pos in ("rpe", "none")}  # one seed: the same windows and masks
    for runner in runners.values():
        runner.step()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            start = time.process_time()
            runner.step()
            seconds[name].append(time.process_time() - start)
    ratios = [a / b for a, b in zip(seconds["rpe"], seconds["none"])]
    return dict(model=model, px=px, windows=windows, batch=batch, cpu_s=seconds,
                rpe_over_none=statistics.median(ratios), ratio_range=[min(ratios), max(ratios)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="GEMM rounds (default: 7)")
    parser.add_argument("--step-rounds", type=int, default=6, help="interleaved step pairs (default: 6)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gemms = gemm_rates(args.rounds)
    for name, rate in gemms.items():
        print(f"{name:58s} {rate['gflops']:7.1f} GFLOP/s  {rate['of_ceiling']:5.2f} of the 2048^3 mm")
    irpe = [irpe_cost(*config, args.step_rounds) for config in STEPS]
    for r in irpe:
        print(f"{r['model']} {r['px']} px {r['windows']} windows: iRPE / no position {r['rpe_over_none']:.3f} "
              f"(rounds {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f})")
    if args.json:
        meta = dict(command=command_line("python", "benchmarks/small_widths.py", *sys.argv[1:]), threads=args.threads,
                    torch=torch.__version__, machine=machine_name(CPU), load_avg=load_average())
        write_json(args.json, dict(meta=meta, gemms=gemms, irpe=irpe))


if __name__ == "__main__":
    main()
