"""What ``lomar bench`` reports: window settings per size, ratios, the table, the plot, the machine.

Imports no torch and no pyplot: the figure is drawn on a plain :class:`matplotlib.figure.Figure`,
so no global backend is chosen on anyone's behalf; matplotlib and the figure writer (whose module imports torch) are
imported by :func:`plot_times` alone, so that ``--task backbone``'s torch-free parent and its children describe their
run without them.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import TextIO

from lomar.bench import stats

__all__ = ["compare", "beit_comparisons", "print_table", "plot_times", "machine_name", "describe", "shape"]


def machine_name(device) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or "unknown CPU"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def compare(records: list[dict]) -> list[dict]:
    """Per size and LoMaR window count: MAE/LoMaR time and FLOP ratios; adds each record's time
    relative to its own configuration at the base size (224 px if measured, else the smallest)."""
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
            # one size's configurations run round by round: each round's MAE/LoMaR is a side-by-side ratio
            rounds = [a / b for a, b in zip(m.get("step_times_s", ()), rec.get("step_times_s", ()))]
            out.append(dict(img_size=rec["img_size"], windows=rec["windows"], window_setting=rec["window_setting"],
                            mae_over_lomar_time=m["step_s"] / rec["step_s"],
                            mae_over_lomar_time_rounds=rounds,
                            mae_over_lomar_flops=m["flops"] / rec["flops"],
                            mae_decoder_share=m.get("decoder_flops", 0) / m["flops"],
                            encoder_tokens=dict(mae=m.get("encoder_tokens"), lomar=rec.get("encoder_tokens"))))
    return out


def describe(meta: dict) -> str:
    """One line saying what every figure of the table is: the model, batch, precision, threads, the steps timed
    (``meta['timed']``: what one holds; ``meta['order']``: how the configurations took turns) and the machine's
    load around the run."""
    load = meta.get("load_avg_before"), meta.get("load_avg_after")
    said = " (load average before, after: " + ", ".join(f"{x[0]:.2f}" for x in load) + ")" if all(load) else ""
    compiled = f", compiled ({meta['compile_mode']})" if meta.get("compile") else ""
    return (f"{meta['model']}, batch {meta['batch_size']}, {meta['precision']}{compiled}, {meta['device']}, "
            f"{meta['threads']} threads: s/step is the median of {meta['steps']} timed {meta['timed']} per "
            f"configuration, {meta['order']}, after {meta['warmup']} warm-up step(s){said}")


def _in_series(rec: dict, key: tuple) -> bool:
    """A LoMaR point of --windows paper doubles as the fixed count it equals (224 px's 4 for --windows 4)."""
    method, setting, windows = key
    if rec["method"] != method:
        return False
    return rec["window_setting"] == "paper" if setting == "paper" else rec["windows"] == windows


def shape(records: list[dict]) -> list[str]:
    """Per method / window setting timed at two sizes or more: time, FLOPs and pixels from the smallest size to
    the largest, against what the claim expects (fixed windows: flat; paper windows: with the windows; global
    attention: with the pixels or faster). Time is flagged when it does not follow FLOPs (within 50 %) at every
    pairing of the two sizes' steps, and called too noisy to tell when some pairings follow them and some not."""
    lines, unfollowed = [], False
    keys = ((r["method"], r["window_setting"], None if r["window_setting"] == "paper" else r["windows"])
            for r in records)
    for key in dict.fromkeys(keys):
        rows = sorted((r for r in records if _in_series(r, key)), key=lambda r: r["img_size"])
        if len(rows) < 2:
            continue
        a, b = rows[0], rows[-1]
        time, flops, pixels = b["step_s"] / a["step_s"], b["flops"] / a["flops"], (b["img_size"] / a["img_size"]) ** 2
        if key[1] == "paper":
            expect = f"windows {a['windows']} -> {b['windows']}: expected to grow with them"
        elif key[2] is None:
            expect = f"pixels x{pixels:.2f}: expected to grow with them or faster"
        else:
            expect = "expected flat"
        if key[0] == "beit_window":  # its dVAE labels the whole image, windows or not (timing.build_runner)
            expect += f" in its encoder, its tokenizer's work with the pixels x{pixels:.2f}"
        name = key[0] + (" (paper windows)" if key[1] == "paper" else f" ({key[2]} windows)" if key[2] else "")
        # every pairing of a step at one size with a step at the other: the sizes are not interleaved, so the
        # median's ratio alone can flag (or pass) a series whose steps say either
        ta, tb = a.get("step_times_s") or [a["step_s"]], b.get("step_times_s") or [b["step_s"]]
        low, high = min(tb) / max(ta), max(tb) / min(ta)
        steps = f" (its steps x{low:.2f}-x{high:.2f})" if high > low else ""
        line = f"  {name}, {a['img_size']} -> {b['img_size']}px: time x{time:.2f}{steps}, FLOPs x{flops:.2f}; {expect}"
        inside = [2 / 3 < ratio / flops < 3 / 2 for ratio in (low, time, high)]  # time should follow the work
        if not any(inside) and (low > flops) == (high > flops):
            line, unfollowed = line + " -- time does not follow FLOPs", True
        elif not all(inside):  # the spread crosses an edge of the band: one edge, or both
            below, above = low / flops <= 2 / 3, high / flops >= 3 / 2
            reach = "both sides of following FLOPs" if below and above else \
                f"from following FLOPs (within 50 %) to {'above' if above else 'below'} them"
            line += f" -- its steps' spread reaches {reach}: too noisy to tell; raise --steps"
        lines.append(line + "\n")
    if unfollowed:  # once, however many series it is
        lines.append("  where time does not follow FLOPs: per-step overhead of a small batch or model, or load that "
                     "changed between sizes (they are not interleaved); raise --batch-size, or compare FLOPs\n")
    return lines


def beit_comparisons(records: list[dict]) -> list[dict]:
    """Per size: BEiT / LoMaR, BEiT / BEiT+windows and BEiT+windows / LoMaR time and FLOP ratios."""
    def at(method: str, size: int) -> dict | None:
        found = [r for r in records if r["method"] == method and r["img_size"] == size]
        paper = [r for r in found if r.get("window_setting") == "paper"]
        return (paper or found or [None])[0]

    out = []
    for size in sorted({r["img_size"] for r in records}):
        beit, window, lomar = at("beit", size), at("beit_window", size), at("lomar", size)
        row: dict = {"img_size": size}
        for name, a, b in (("beit_over_lomar", beit, lomar), ("beit_over_beit_window", beit, window),
                           ("beit_window_over_lomar", window, lomar)):
            if a is not None and b is not None:
                row[f"{name}_time"] = a["step_s"] / b["step_s"]
                row[f"{name}_flops"] = a["flops"] / b["flops"]
        if len(row) > 1:
            out.append(row)
    return out


def _win(r: dict) -> str:
    """A row's windows as the table's win column gives them: 4, 4p (--windows paper's), - (none)."""
    return "-" if r["windows"] is None else f"{r['windows']}{'p' if r['window_setting'] == 'paper' else ''}"


def print_table(records: list[dict], comparisons: list[dict], ceiling: float | None, stream: TextIO,
                beit_ratios: list[dict] | None = None, by_library: dict[str, float] | None = None) -> None:
    """The results as a fixed-width table, then the MAE / LoMaR and BEiT ratios per size.

    ``by_library``: the median GEMM rate of each library timed for the ceiling (its best). A record whose
    ``status`` is ``failed`` is a line saying why; ``partial``, a median of fewer steps than asked (the bench
    was stopped); ``ceiling`` None: no round ran, no MFU."""
    w = stream.write
    libraries = ", ".join(f"{name} {rate / 1e9:,.1f}" for name, rate in (by_library or {}).items())
    w("GEMM ceiling (same run, same dtype): " + ("not measured (no round ran)" if ceiling is None else
      f"{ceiling / 1e9:,.1f} GFLOP/s" + (f" (the faster of {libraries})" if len(by_library or {}) > 1 else ""))
      + "\n")
    failed = [r for r in records if r.get("status") == "failed"]
    records = [r for r in records if r.get("status") != "failed"]
    head = (f"{'method':<11} {'px':>4} {'win':>5} {'s/step':>8} {'spread':>6} {'img/s':>7} {'GFLOP':>8} "
            f"{'GFLOP/s':>8} {'MFU':>5} {'vs base':>8} {'peak mem':>10}\n")
    w(head)
    w("-" * (len(head) - 1) + "\n")
    for r in records:
        rel = "-" if r.get("time_vs_base") is None else f"{r['time_vs_base']:.2f}x"
        mem = f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB" if r["peak_mem_bytes"] >= 0 else "n/a"
        spread = stats.spread(r.get("step_times_s", ()))
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.0%}"
        partial = f"  {len(r['step_times_s'])} step(s): stopped" if r.get("status") == "partial" else ""
        win = _win(r)
        w(f"{r['method']:<11} {r['img_size']:>4} {win:>5} {r['step_s']:>8.3f} {spread:>6} {r['images_per_s']:>7.2f} "
          f"{r['flops'] / 1e9:>8.1f} {r['achieved_flops'] / 1e9:>8.1f} {mfu:>5} {rel:>8} {mem:>10}{partial}\n")
    for r in failed:
        w(f"{r['method']:<11} {r['img_size']:>4} {_win(r):>5} failed at its {r['error']}\n")
    if records:
        kind = records[0]["peak_mem_kind"]
        w("win: windows per image, p = --windows paper (the paper's count where it gives one, else pretrain's "
          f"auto rule); vs base: time / own {records[0]['base_size']}px time; {stats.SPREAD_LEGEND}; "
          f"peak mem: {'max allocated' if kind == 'cuda_max_allocated' else 'RSS growth during a step (CPU)'}\n")
        if over := [f"{r['method']} {r['img_size']}px" for r in records if (r.get("mfu") or 0) > 1]:
            w(f"MFU over 100 % ({', '.join(over)}): the GEMM timed as the ceiling between rounds ran slower than "
              "the step's own products, under other load: the ceiling is not this machine's, read MFU as rough\n")
        if len({r["img_size"] for r in records}) > 1:  # a load that comes or goes between sizes shows as a size's cost
            w("the methods of one size run interleaved, the sizes one after another: on a busy machine compare "
              "times within a size, and across sizes the GFLOP column\n")
    if comparisons:
        w("\nMAE / LoMaR per size\n")
        for c in comparisons:
            rounds = c.get("mae_over_lomar_time_rounds") or []
            within = f" (per round {min(rounds):.2f}-{max(rounds):.2f}x)" if len(rounds) > 1 else " (one round)"
            w(f"  {c['img_size']:>4}px, {c['windows']} windows ({c['window_setting']}): time "
              f"{c['mae_over_lomar_time']:.2f}x{within}, FLOPs {c['mae_over_lomar_flops']:.2f}x; MAE's decoder "
              f"{c.get('mae_decoder_share', 0):.0%} of MAE's FLOPs; encoder tokens an image: MAE "
              f"{c.get('encoder_tokens', {}).get('mae')}, LoMaR {c.get('encoder_tokens', {}).get('lomar')}\n")
        # the decoder is as wide and deep whatever the encoder: 55 % of ViT-B/16's step at 224 px, 95 % of ViT-Ti's
        if any(c.get("mae_decoder_share", 0) > 0.75 for c in comparisons):
            w("  MAE's step here is mostly its decoder, which keeps its size whatever --model: with an encoder smaller "
              "than the paper's ViT-B these ratios measure that decoder more than LoMaR's windows\n")
    for c in beit_ratios or ():
        w(f"  {c['img_size']:>4}px BEiT ratios: " + ", ".join(
            f"{k.removesuffix('_time')} {v:.2f}x" for k, v in c.items() if k.endswith("_time")) + " (time)\n")
    if lines := shape(records):
        w("\nSmallest to largest size\n")
        for line in lines:
            w(line)


_PLOT_NAMES = {"lomar": "LoMaR", "mae": "MAE (ViT + 512x8 decoder, 75% masked)", "beit": "BEiT",
               "mae_window": "MAE per 7x7 window", "beit_window": "BEiT + 7x7 windows"}


def plot_times(records: list[dict], path: str | Path, subtitle: str = "") -> Path:
    """Seconds per training step against image size, one line per method/window setting, log-log."""
    series: dict[str, list[tuple[int, float]]] = {}
    fixed = {r["windows"] for r in records if r["method"] == "lomar" and r["window_setting"] == "fixed"}
    for r in records:  # every method timed: BEiT and the windowed MAE/BEiT were timed and left off
        name = _PLOT_NAMES.get(r["method"], r["method"])
        labels = []
        if r["windows"] is None:
            labels.append(name)
        elif r["window_setting"] == "paper":
            labels.append("LoMaR, paper windows (4@224, 6@384, 9@448, rule elsewhere)" if r["method"] == "lomar"
                          else f"{name}, LoMaR's window counts")
        if r["windows"] is not None and (r["window_setting"] == "fixed" or r["method"] == "lomar" and
                                         r["windows"] in fixed):  # a paper point may double as fixed
            labels.append(f"{name}, {r['windows']} windows")
        for label in labels:
            series.setdefault(label, []).append((r["img_size"], r["step_s"]))
    from matplotlib.figure import Figure

    from lomar.viz.reconstruction import save_figure  # torch and matplotlib: for --plot alone

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, points in series.items():
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
        for x, y in points:
            ax.annotate(f"{y:.2g}s", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    sizes = sorted({r["img_size"] for r in records})
    ax.set(xscale="log", yscale="log", xticks=sizes, xticklabels=[str(s) for s in sizes], xlabel="image size (px)",
           ylabel="seconds per training step (fwd+bwd+AdamW)")
    ax.minorticks_off()
    ax.set_title("Training step time vs image size" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)
