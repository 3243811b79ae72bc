"""Summaries of a ``gpu_check.sh`` results folder, from whatever JSON it holds.

    python benchmarks/gpu_summary.py ratios DIR            # ratios.md / ratios.json from DIR/bench-*.json
    python benchmarks/gpu_summary.py mfu DIR [PX WINDOWS]  # mfu.md / mfu.json from DIR/{mfu,bench}-*.json

``gpu_check.sh`` runs both at the end of its parts. Results of several device calls (each call
writes its own folder) are merged by copying their JSON into one folder and running this again.
Standard library only: it runs wherever the JSON is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAPER = {("mae", 384): 2.5, ("mae", 448): 3.1, ("beit", 384): 5.0, ("beit", 448): 5.3}  # Table 1: X time / LoMaR
KINDS = ("gemm", "attention", "fused", "optimizer", "other")  # lomar.bench.profile.KINDS


def _records(paths: list[Path], failed: list[str] | None = None):
    """(file name, its meta, one record with a step time) for every record of ``paths``; unreadable files skipped.
    A file of a bench cut short (``"complete": false``) is named ``NAME (incomplete)``; ``failed`` collects a line
    per failed record."""
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        meta = data.get("meta", {})
        name = path.name + (" (incomplete)" if meta.get("complete") is False else "")
        for record in data.get("records", []):
            if record.get("step_s"):
                yield name, meta, record
            elif record.get("status") == "failed" and failed is not None:
                failed.append(f"{record.get('method')} {record.get('img_size')} px ({name}): {record.get('error')}")


def ratios(dest: Path) -> list[str]:
    """X time / LoMaR time per image size, eager and compiled apart, beside the paper's Table 1."""
    groups: dict[tuple[bool, int], list[dict]] = {}  # compiled runs come one file per method
    failed: list[str] = []
    for name, meta, r in _records(sorted(dest.glob("bench-*.json")), failed):
        groups.setdefault((bool(meta.get("compile")), r["img_size"]), []).append(dict(r, source=name))
    rows = []
    for (compiled, size), here in sorted(groups.items()):
        at = {r["method"]: r for r in here if r.get("window_setting") != "paper"}
        at.update({r["method"]: r for r in here if r.get("window_setting") == "paper"})  # the paper's windows win
        if "lomar" not in at:
            continue
        for other in ("mae", "beit", "beit_window"):
            if other in at:
                rows.append(dict(img_size=size, compile=compiled, other=other,
                                 ratio=at[other]["step_s"] / at["lomar"]["step_s"], paper=PAPER.get((other, size)),
                                 lomar_mfu=at["lomar"].get("mfu"), other_mfu=at[other].get("mfu"),
                                 source=", ".join(dict.fromkeys([at["lomar"]["source"], at[other]["source"]]))))
    (dest / "ratios.json").write_text(json.dumps(rows, indent=1) + "\n")

    def pct(v):
        return "-" if v is None else f"{100 * v:.0f} %"

    lines = ["Eager rows: every method in one process, steps interleaved; compiled rows: one process per method.",
             "", "| px | step | X | X time / LoMaR time | paper (Table 1) | LoMaR MFU | X MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "-" if r["paper"] is None else f"{r['paper']}x"
        lines.append(f"| {r['img_size']} | {'compiled' if r['compile'] else 'eager'} | {r['other']} "
                     f"| {r['ratio']:.2f}x | {paper} | {pct(r['lomar_mfu'])} | {pct(r['other_mfu'])} |")
    lines += ["", "Failed (no step time):", *(f"- {line}" for line in failed)] if failed else []
    (dest / "ratios.md").write_text("\n".join(lines) + "\n")
    return lines


def mfu(dest: Path, size: int = 448, windows: int = 9) -> list[str]:
    """Every LoMaR run at ``size`` px with ``windows`` windows, best MFU first, with its profile's shares."""
    paths = sorted(dest.glob("mfu-*.json")) + sorted(dest.glob("bench-*.json"))
    rows = [dict(r, source=name) for name, _, r in _records(paths)
            if r.get("method") == "lomar" and r.get("img_size") == size and r.get("windows") == windows]
    rows.sort(key=lambda r: -r["mfu"])
    lines = [f"LoMaR {size} px, {windows} windows: best first", "",
             "| batch | step | img/s | MFU | peak GiB | " + " | ".join(KINDS) + " | source |",
             "|---|---|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for r in rows:
        step = r.get("compile_mode", "default") if r.get("compile") else "eager"
        shares = r.get("time_shares") or {}
        cells = " | ".join(f"{100 * shares[k]:.0f} %" if k in shares else "-" for k in KINDS)
        lines.append(f"| {r['batch_size']} | {step} | {r['images_per_s']:.1f} | {100 * r['mfu']:.1f} % "
                     f"| {r['peak_mem_bytes'] / 2**30:.1f} | {cells} | {r['source']} |")
    (dest / "mfu.json").write_text(json.dumps(rows, indent=1) + "\n")
    (dest / "mfu.md").write_text("\n".join(lines) + "\n")
    return lines if rows else []


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("ratios", "mfu") or not Path(argv[1]).is_dir():
        given = " ".join(argv) or "nothing"
        print(f"gpu_summary.py: got {given}; usage: gpu_summary.py ratios DIR | mfu DIR [PX WINDOWS], "
              f"DIR a folder of gpu_check.sh results", file=sys.stderr)
        return 2
    dest = Path(argv[1])
    lines = ratios(dest) if argv[0] == "ratios" else mfu(dest, *map(int, argv[2:4]))
    print("\n".join(lines) if lines else f"no matching records in {dest}")
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
