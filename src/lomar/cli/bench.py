"""``lomar bench``: LoMaR vs MAE training-step cost across image sizes, on this machine.

For every image size it builds one LoMaR per window setting and one MAE, warms them up and
times full training steps (forward, backward, AdamW) interleaved A B A B … in one process,
reporting medians, FLOPs counted by ``torch.utils.flop_counter`` and the share of a large
GEMM's FLOP/s (measured in the same run, same dtype) the step achieves.

Window settings: ``paper`` uses the paper's windows per image, 4 at 224 px, 6 at 384 and 9 at
448; other sizes take the count of the largest paper size not above them (4 below 224, 9 above
448), so the encoder's work stops growing past 448 as in the paper's largest setting. An
integer N uses N windows at every size: LoMaR's cost is then independent of the image size.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

from lomar.errors import UsageError

__all__ = ["add_arguments", "run", "paper_windows", "plot_times"]

PAPER_WINDOWS = {224: 4, 384: 6, 448: 9}
DEFAULT_SIZES = (224, 384, 448, 672, 896)


def paper_windows(img_size: int) -> int:
    """The paper's windows per image at ``img_size`` (see the module docstring for other sizes)."""
    below = [s for s in PAPER_WINDOWS if s <= img_size]
    return PAPER_WINDOWS[max(below)] if below else PAPER_WINDOWS[min(PAPER_WINDOWS)]


def _window_setting(text: str) -> str | int:
    if text == "paper":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'paper' or a window count, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"window count must be positive, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Example (a few minutes on an idle 2-core CPU): lomar bench --model vit_base_patch16 --batch-size 4 "
                     "--sizes 224 448 --steps 3 --json bench.json --plot bench.png")
    parser.add_argument("--model", default="vit_base_patch16", help="encoder, e.g. vit_base_patch16")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), metavar="PX",
                        help="image sizes (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=["lomar", "mae"], choices=["lomar", "mae", "beit", "mae_window"],
                        help="beit times BEiT and BEiT + 7x7 windows (beit_window); mae_window: MAE per 7x7 "
                             "window; windowed variants use LoMaR's window counts")
    parser.add_argument("--windows", type=_window_setting, nargs="+", default=["paper"],
                        metavar="N|paper", help="LoMaR windows per image: 'paper' (4@224, 6@384, "
                        "9@448, 9 above) and/or fixed counts, e.g. --windows paper 4")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="fp32, or autocast to bf16/fp16 (fp16 with a gradient scaler)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1, help="plain untimed steps per configuration before "
                        "timing (after one FLOP-counting and one memory step)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results as JSON")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="plot time per step against image size")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: width 32, depth 1


def _plan(args: argparse.Namespace) -> dict[int, list[tuple[str, int | None, str]]]:
    """Per size: (method, windows, setting) configurations, validated before any work."""
    from lomar.models.masking import check_window_request, grid_size  # torch-free checks
    from lomar.models.vit import model_config

    try:
        patch = model_config(args.model).patch_size
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        raise UsageError("--batch-size and --steps must be positive and --warmup non-negative")
    plan: dict[int, list[tuple[str, int | None, str]]] = {}
    for size in dict.fromkeys(args.sizes):
        try:
            grid = grid_size(size, patch)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        configs: list[tuple[str, int | None, str]] = []
        if "lomar" in args.methods:
            seen = set()
            for setting in args.windows:
                n = paper_windows(size) if setting == "paper" else setting
                if n in seen:
                    continue
                seen.add(n)
                try:
                    check_window_request(grid, 7, n, 0.8)
                except ValueError as exc:
                    raise UsageError(f"{size}px: {exc}") from None
                configs.append(("lomar", n, "paper" if setting == "paper" else "fixed"))
        if "mae" in args.methods:
            configs.append(("mae", None, "-"))
        windowed = paper_windows(size) if "paper" in args.windows else args.windows[0]
        if "beit" in args.methods:
            configs.append(("beit", None, "-"))
        for method, wanted in (("mae_window", "mae_window" in args.methods), ("beit_window", "beit" in args.methods)):
            if wanted:
                try:
                    check_window_request(grid, 7, windowed, 0.75)
                except ValueError as exc:
                    raise UsageError(f"{size}px: {exc}") from None
                configs.append((method, windowed, "paper" if "paper" in args.windows else "fixed"))
        plan[size] = configs
    return plan


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    import torch

    from lomar.train.runtime import retain_freed_memory
    from lomar.bench.timing import build_runner, gemm_ceiling, interleaved_times, median

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = device.type == "cpu" and retain_freed_memory()
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    say(f"{args.model}, batch {args.batch_size}, {args.precision}, {device}, "
        f"{torch.get_num_threads()} threads, sizes {list(plan)}")
    gemm = gemm_ceiling(device, args.precision, 256 if args.tiny else None)
    records: list[dict] = []
    rates: list[float] = []
    started = time.perf_counter()
    for size, configs in plan.items():
        runners = [build_runner(m, args.model, size, w, args.batch_size, device, args.precision, args.compile,
                                tiny=args.tiny)
                   for m, w, _ in configs]
        rates += interleaved_times(runners, args.steps, args.warmup, gemm, say)
        for (method, windows, setting), r in zip(configs, runners):
            flops, (mem, mem_kind) = r.flops, r.peak_mem
            step_s = median(r.times)
            records.append(dict(
                method=method, img_size=size, windows=windows, window_setting=setting,
                batch_size=args.batch_size, step_s=step_s, images_per_s=args.batch_size / step_s,
                flops=flops, achieved_flops=flops / step_s, peak_mem_bytes=mem, peak_mem_kind=mem_kind,
                step_times_s=list(r.times), precision=args.precision, compile=args.compile,
                device=str(device)))
        del runners
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ceiling = median(rates)
    for rec in records:
        rec["gemm_flops"] = ceiling
        rec["mfu"] = rec["achieved_flops"] / ceiling
    comparisons = _compare(records)
    from lomar.bench.methods import beit_comparisons

    beit_ratios = beit_comparisons(records)
    _print_table(records, comparisons, ceiling, sys.stdout)
    for c in beit_ratios:
        sys.stdout.write(f"  {c['img_size']:>4}px BEiT ratios: " + ", ".join(
            f"{k.removesuffix('_time')} {v:.2f}x" for k, v in c.items() if k.endswith("_time")) + " (time)\n")
    meta = dict(model=args.model, batch_size=args.batch_size, precision=args.precision,
                compile=args.compile, device=str(device), threads=torch.get_num_threads(),
                steps=args.steps, warmup=args.warmup, torch=torch.__version__,
                machine=_machine(device), malloc_retains_memory=retained, gemm_flops=ceiling,
                gemm_flops_all=rates,
                wall_s=time.perf_counter() - started, command="lomar bench " + " ".join(sys.argv[2:])
                if len(sys.argv) > 1 and sys.argv[1] == "bench" else None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, records=records, comparisons=comparisons,
                                              beit_comparisons=beit_ratios), indent=1))
        say(f"wrote {args.json}")
    if args.plot:
        plot_times(records, args.plot, f"{args.model}, batch {args.batch_size}, {args.precision}, "
                   f"{meta['machine']}")
        say(f"wrote {args.plot}")
    return 0


def _machine(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def _compare(records: list[dict]) -> list[dict]:
    """Per size and LoMaR window count: MAE/LoMaR time and FLOP ratios; time vs own base size."""
    mae = {r["img_size"]: r for r in records if r["method"] == "mae"}
    out = []
    base_size = 224 if any(r["img_size"] == 224 for r in records) else min(r["img_size"] for r in records)
    for rec in records:
        same = [r for r in records if r["method"] == rec["method"] and r["img_size"] == base_size
                and (r["windows"] == rec["windows"] or rec["window_setting"] == r["window_setting"] == "paper")]
        rec["base_size"] = base_size
        rec["time_vs_base"] = rec["step_s"] / same[0]["step_s"] if same else None
        if rec["method"] == "lomar" and rec["img_size"] in mae:
            m = mae[rec["img_size"]]
            out.append(dict(img_size=rec["img_size"], windows=rec["windows"],
                            window_setting=rec["window_setting"],
                            mae_over_lomar_time=m["step_s"] / rec["step_s"],
                            mae_over_lomar_flops=m["flops"] / rec["flops"]))
    return out


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 0 else "n/a"


def _print_table(records: list[dict], comparisons: list[dict], ceiling: float, stream) -> None:
    w = stream.write
    w(f"GEMM ceiling (same run, same dtype): {ceiling / 1e9:,.1f} GFLOP/s\n")
    head = (f"{'method':<11} {'px':>4} {'win':>5} {'s/step':>8} {'img/s':>7} {'GFLOP':>8} "
            f"{'GFLOP/s':>8} {'MFU':>5} {'vs base':>8} {'peak mem':>10}\n")
    w(head)
    w("-" * (len(head) - 1) + "\n")
    for r in records:
        win = "-" if r["windows"] is None else f"{r['windows']}{'p' if r['window_setting'] == 'paper' else ''}"
        rel = "-" if r.get("time_vs_base") is None else f"{r['time_vs_base']:.2f}x"
        w(f"{r['method']:<11} {r['img_size']:>4} {win:>5} {r['step_s']:>8.3f} {r['images_per_s']:>7.2f} "
          f"{r['flops'] / 1e9:>8.1f} {r['achieved_flops'] / 1e9:>8.1f} {r['mfu']:>5.0%} {rel:>8} "
          f"{_fmt_bytes(r['peak_mem_bytes']):>10}\n")
    if records:
        kind = records[0]["peak_mem_kind"]
        w(f"win: windows per image, p = paper setting; vs base: time / own {records[0]['base_size']}px time; "
          f"peak mem: {'max allocated' if kind == 'cuda_max_allocated' else 'RSS growth during a step (CPU)'}\n")
    if comparisons:
        w("\nMAE / LoMaR per size\n")
        for c in comparisons:
            w(f"  {c['img_size']:>4}px, {c['windows']} windows ({c['window_setting']}): time "
              f"{c['mae_over_lomar_time']:.2f}x, FLOPs {c['mae_over_lomar_flops']:.2f}x\n")


def plot_times(records: list[dict], path: Path, subtitle: str = "") -> None:
    """Seconds per training step against image size, one line per method/window setting, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lomar.viz.reconstruction import save_figure

    series: dict[str, list[tuple[int, float]]] = {}
    fixed = {r["windows"] for r in records if r["window_setting"] == "fixed"}
    for r in records:
        labels = []
        if r["method"] == "mae":
            labels.append("MAE (ViT + 512x8 decoder, 75% masked)")
        elif r["window_setting"] == "paper":
            labels.append("LoMaR, paper windows (4@224, 6@384, 9@448+)")
        if r["method"] == "lomar" and r["windows"] in fixed:  # a paper point may double as fixed
            labels.append(f"LoMaR, {r['windows']} windows")
        for label in labels:
            series.setdefault(label, []).append((r["img_size"], r["step_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
        for x, y in points:
            ax.annotate(f"{y:.2g}s", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    sizes = sorted({r["img_size"] for r in records})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("image size (px)")
    ax.set_ylabel("seconds per training step (fwd+bwd+AdamW)")
    ax.set_title("Training step time vs image size" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
