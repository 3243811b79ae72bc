"""Presets that mirror the paper's experiments, scaled to any dataset and to a CPU.

Each of the paper's experiments runs at ``--scale small`` (a small ViT on 96 px crops: a CPU in
minutes) or ``--scale paper`` (ViT-B/16 at 224 px, epoch-based, each method on its own recipe: a GPU
and the user's data; the command prints the settings, and runs them when given ``--data``).

- ``fig3``: LoMaR vs MAE (and BEiT when ``lomar pretrain --method beit`` is accepted) along the
  budget (accuracy vs pretraining time, the paper's Fig. 3).
- ``table5``: BEiT vs BEiT + windows (7:4), all else BEiT's recipe (the paper's Table 5).
- ``windows``: window size : windows per image 5:8, 7:4, 9:3, 11:2, 14:1 (Table 6, the paper's 14x14
  grid); at small scale scaled to the grid: size ``w' = clamp(round(w * g / 14), 2, g)`` on a g x g
  grid, count kept, so each setting covers about the same share of the image as in the paper.
- ``mask-ratio``: LoMaR at 30/40/.../90 % of each window masked (the paper's sweep).  ``pos``:
  contextual RPE vs absolute sin-cos positions.
- ``enc-dec`` (the paper's §4.6): in the same windows, LoMaR's encoder only vs MAE's encoder and
  decoder (``--method mae --windows N``: windowed MAE), with global MAE as the reference.
- ``digits``: the bundled real data (scikit-learn's handwritten digits), LoMaR vs MAE vs random
  init, k-NN + linear probe + finetune + held-out reconstruction loss, at equal time and steps.
- ``digits-checks``: is LoMaR's weaker ``digits`` result its learning rate or its window scale?
  One seed of ``digits``' model, recipe and evaluations; LoMaR at lr 3e-4 / 1e-3 / 3e-3 and with
  windows 3x3 (4 per image) / 5x5 (4) / 8x8 (1, the whole grid), MAE at lr 1e-3 as the reference.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lomar.checkpoints.own_names import own_folder, remove_made_beside
from lomar.cli.study.flags import parse_flags
from lomar.cli.study.spec import Budget, StudySpec, parse_budget, parse_spec
from lomar.errors import UsageError
from lomar.train.config import add_config_arguments, method_recipe, resolve_config
from lomar.window_counts import PAPER_WINDOW_SIZES

__all__ = ["PRESETS", "PAPER_PRESETS", "SCALES", "build_preset", "describe", "scaled_windows", "digits_data",
           "method_available"]

# How long a digits build waits for another command's build of the same data (seconds of PNG writing)
BUILD_WAIT_S = 300.0
log = logging.getLogger("lomar.train")
PRESETS = ("fig3", "table5", "windows", "mask-ratio", "pos", "enc-dec", "digits", "digits-checks")
PAPER_PRESETS = PRESETS[:6]  # the paper's experiments: each has a paper scale
SCALES = ("small", "paper")
MASK_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the paper's mask-ratio sweep, 30-90 %

# --scale paper: ViT-B/16 at 224 px (14x14 grid), window 7x7, the methods' own recipes (SPEC §4,
# BEIT_SPEC §4), epoch-based. The paper's runs use 8+ GPUs; the batch per device and the epochs
# below are this preset's choice (override with --budget, or write a spec).
PAPER_SCALE = dict(model="vit_base_patch16", img_size=224, window_size=7, batch_size=128, epochs=400, save_every=20,
                   log_every=100)
PAPER_BUDGET = "400epochs"
PAPER_SLICE = "1800s"  # cells of one seed take turns in half-hour slices
PAPER_SCALE_NOTE = ("ViT-B/16 at 224 px (14x14 patch grid), 7x7 windows, 4 per image for LoMaR (the paper's), mask "
                    "80 % per window (LoMaR) / 75 % (MAE) / blockwise (BEiT), each method on its own paper's recipe; "
                    "batch 128 per device and 400 epochs are this preset's choice, not the paper's (set --budget).")

# A small ViT that trains at a few steps per second on 2 CPU cores (the pretrain demo's model).
SMALL = dict(embed_dim=128, depth=4, num_heads=4, patch_size=8, img_size=96, batch_size=16, lr=1e-3,
             warmup_epochs=1, epochs=10000, save_every=10000, workers=0, log_every=1000)
SMALL_DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
# Digits: benchmarks/digits.py's model and recipe (ViT patch 4 on 32 px, width 64, 4 blocks);
# 10 steps per epoch, so 5 warm-up epochs = 50 steps, then a cosine over 100k steps: constant.
DIGITS = dict(SMALL, embed_dim=64, patch_size=4, img_size=32, batch_size=128, warmup_epochs=5, threads=1)
DIGITS_GRID = [dict(label="lomar", method="lomar", window_size=5, windows=4, mask_ratio=0.8),
               dict(label="mae", method="mae", decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                    mask_ratio=0.75)]
# Finetuning fixed a priori, the same for every encoder: short, no mixup/cutmix/RandAugment
# (8x8 scans upsampled have no detail for them), label smoothing 0.1, layer decay 0.75. Crops keep
# at least half the area: the digit fills the middle 28 of 32 px, and timm's 8 % cuts most of it away.
# 20 epochs: with 10, every encoder finetuned below its own linear probe (the recipe was the limit).
DIGITS_FINETUNE = dict(epochs=20, batch_size=64, blr=5e-3, warmup_epochs=2, layer_decay=0.75, weight_decay=0.05,
                       drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0, aa="none", workers=0,
                       crop_scale=(0.5, 1.0), threads=1)
DIGITS_EVAL = dict(metrics=["knn", "linprobe", "finetune", "heldout_loss"], img_size=32, equal_steps=True,
                   knn=dict(k=20, temperature=0.07), linprobe=dict(epochs=100, lr=1e-2), finetune=DIGITS_FINETUNE)
# One axis, not lr x window: the default LoMaR cell belongs to both sweeps and runs once. 8x8 x1
# is the whole 8x8 grid in one window (the paper's 14:1 at this scale).
_LOMAR = DIGITS_GRID[0]
DIGITS_CHECKS_GRID = [{**_LOMAR, "label": "lomar lr=3e-4", "lr": 3e-4},
                      {**_LOMAR, "label": "lomar lr=1e-3 5x5 x4", "lr": 1e-3},
                      {**_LOMAR, "label": "lomar lr=3e-3", "lr": 3e-3},
                      {**_LOMAR, "label": "lomar 3x3 x4", "window_size": 3},
                      {**_LOMAR, "label": "lomar 8x8 x1", "window_size": 8, "windows": 1},
                      {**DIGITS_GRID[1], "label": "mae lr=1e-3", "lr": 1e-3}]


def scaled_windows(grid: int) -> list[dict[str, Any]]:
    """The paper's (size, count) pairs on a ``grid`` x ``grid`` patch grid (see module docstring)."""
    out = []
    for size, count in PAPER_WINDOW_SIZES.items():
        scaled = min(grid, max(2, round(size * grid / 14)))
        label = f"{size}:{count}" + (f" as {scaled}:{count}" if scaled != size else "")
        out.append(dict(label=label, window_size=scaled, windows=count))
    return out


def method_available(method: str) -> bool:
    """Whether ``lomar pretrain --method METHOD`` resolves to a valid config (detected, not assumed)."""
    try:
        resolve_config(parse_flags(add_config_arguments, ["--method", method, "--print-config"]))
    except ValueError:  # a UsageError or ConfigError naming the method
        return False
    return True


def _data(data: str | None) -> tuple[dict[str, str | None], list[str]]:
    """The data section for a user folder: ROOT/train + ROOT/val (labelled) or ROOT (unlabelled)."""
    if data is None:
        return {}, []
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"--data {data} is not a folder; pass an image folder (with train/ and val/ for accuracy)")
    if (root / "train").is_dir() and (root / "val").is_dir():
        return {"pretrain": str(root / "train"), "train": str(root / "train"), "val": str(root / "val")}, \
            ["knn", "linprobe", "heldout_loss"]
    return {"pretrain": str(root)}, []


def digits_data(root: Path) -> Path:
    """scikit-learn's digits as an ImageFolder (train/ and val/, one folder per digit), built once.

    Each 8x8 scan is upsampled (bilinear) to 28x28 and padded to 32x32, so that the evaluation's
    centre crop (0.875) sees the whole digit; split 75/25 stratified, random_state 0."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.pad(F.interpolate(x, size=28, mode="bilinear", align_corners=False), [2, 2, 2, 2])
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    train, val = train_test_split(range(len(pixels)), test_size=0.25, stratify=digits.target, random_state=0)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root) as locked:
        if (root / "train").is_dir() and (root / "val").is_dir():  # built by the command this one waited for
            return root
        if locked:  # no build holds the lock, so every build folder beside the data is a killed one's
            remove_made_beside(root)
        _build_digits(root, digits.target, pixels, train, val)
    return root


def _build_lock(root: Path) -> contextlib.AbstractContextManager[bool]:
    """Hold ``.NAME.lock`` beside the data ``root`` for a build (the flock of a training run's and an export's lock):
    yields whether it is held. Not held where the filesystem has no flock (a warning); then builds may run side by
    side, each in its own folder, and a killed one's folder stays, as whether its builder lives cannot be told."""
    from lomar.checkpoints.file_lock import holding_file_lock  # torch (checkpoints.io): not for --help

    def waiting(owner: str) -> None:
        log.warning("%s is being built by another command (%s): waiting for it, up to %g s", root, owner,
                    BUILD_WAIT_S)

    def unlocked(reason: str) -> None:
        log.warning("%s: no file lock there (%s); building unlocked: a build killed midway leaves its hidden "
                    ".%s.tmp-* folder beside it, to delete once no study builds there", root, reason, root.name)

    def refusal(owner: str) -> UsageError:
        return UsageError(f"{root} is being built by another command ({owner}), waited for {BUILD_WAIT_S:g} s; "
                          f"run again once it ends, or pass another --out")

    return holding_file_lock(root.with_name(f".{root.name}.lock"), BUILD_WAIT_S, refusal, waiting, unlocked)


def _build_digits(root: Path, target, pixels, train, val) -> None:
    """Write the scans (uint8, (N, 32, 32)) as ROOT/{train,val}/DIGIT/NNNN.png and rename the folder in."""
    from PIL import Image  # as digits_data's: only a build needs it
    # this command's own folder: another one building the data meanwhile (a study beside it, on a filesystem without
    # flock, of the same PID perhaps) has its own, which this one neither removes nor renames
    work = own_folder(root)
    try:
        for split, indices in (("train", train), ("val", val)):
            for i in indices:
                folder = work / split / str(target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[i]).convert("RGB").save(folder / f"{i:04d}.png")
        try:
            os.replace(work, root)
        except OSError:  # a folder is there: another command's build, renamed in meanwhile, is the same data
            if not ((root / "train").is_dir() and (root / "val").is_dir()):
                if not os.path.lexists(root):
                    raise
                raise UsageError(f"{root} is there and is not the digits data (no train/ and val/ in it); move it "
                                 f"away or delete it, or pass another --out") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)  # nothing left once renamed


def build_preset(name: str, data: str | None = None, budget: str | None = None, seeds: int | None = None,
                 out: str | None = None, scale: str = "small") -> StudySpec:
    """The StudySpec of a preset (``out``: where the digits preset builds its data; ``scale``: small
    = a CPU in minutes, paper = the paper's ViT-B settings, for a GPU and the user's data)."""
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    if scale not in SCALES:
        raise UsageError(f"--scale {scale!r} is unknown; choose one of {', '.join(SCALES)}")
    if scale == "paper" and name not in PAPER_PRESETS:
        raise UsageError(f"--preset {name} has no paper scale (it is this project's own experiment); drop "
                         f"--scale paper, or pick one of {', '.join(PAPER_PRESETS)}")
    paper = scale == "paper"
    default = PAPER_BUDGET if paper else "60s" if name in ("fig3", "digits", "digits-checks") else "30s"
    budget = default if budget is None else budget
    b = parse_budget(budget, "--budget")  # named as the user typed it, '' included
    notes: list[str] = []
    if name in ("digits", "digits-checks"):
        if data is not None:
            raise UsageError(f"--preset {name} builds its own data (scikit-learn's digits); drop --data")
        root = digits_data(Path(out or f"studies/{name}") / "data")
        checks = name == "digits-checks"
        raw: dict[str, Any] = dict(
            name=name, budget=budget, seeds=seeds or (1 if checks else 3), slice="10s", settings=DIGITS,
            grid={"variant": DIGITS_CHECKS_GRID} if checks else {"method": DIGITS_GRID}, random_init=not checks,
            # The checks compare cells at equal time; `digits` already gives the equal-steps view,
            # and re-running each faster cell to the slowest one's steps would double the cost.
            eval={**DIGITS_EVAL, "equal_steps": not checks},
            data=_data(str(root))[0])
        notes.append("Data: scikit-learn `load_digits` (1,797 real 8x8 scans), bilinear to 28x28, padded to 32x32, "
                     "stratified 75/25 split (random_state 0): 1347 train / 450 val; pretraining on train only.")
        if checks:
            notes.append("Checks of the `digits` preset's LoMaR (labels: window size AxA x windows per image): lr "
                         "3e-4 / 1e-3 / 3e-3 at 5x5 x4, and windows 3x3 x4 / 5x5 x4 / 8x8 x1 (the whole grid) at "
                         "lr 1e-3; MAE at lr 1e-3 as the reference. Same model, pretraining recipe and evaluations "
                         "as `digits`; no random-init row (see `digits`).")
        return parse_spec(raw, f"--preset {name}", notes=notes)
    section, metrics = _data(data)
    settings = dict(PAPER_SCALE if paper else SMALL)
    grid_side = settings["img_size"] // (16 if paper else settings["patch_size"])
    pairs = scaled_windows(grid_side)  # the paper's (size, count) pairs, on this grid
    window, every = pairs[1], None  # the paper's 7:4, LoMaR's default
    if paper:
        metrics = [*metrics, "finetune"] if metrics else metrics
        notes.append("Paper scale: " + PAPER_SCALE_NOTE)
    if name == "fig3":
        methods = ["lomar", "mae"] + (["beit"] if method_available("beit") else [])
        notes.append(f"Methods: {', '.join(methods)}, each on its own paper's pretraining recipe (`lomar pretrain "
                     f"--method M --print-config`)" + ("" if "beit" in methods else
                     " (`lomar pretrain --method beit` is not accepted by this version: BEiT left out)") + "." +
                     ("" if paper else " MAE's decoder scaled with the encoder, as in enc-dec: "
                                      "{decoder_embed_dim} wide, {decoder_depth} blocks.".format(**SMALL_DECODER)))
        # MAE-base's decoder (512 wide, 8 blocks: narrower than ViT-B) on the small 128-wide encoder took 30-40x
        # the time of a step with SMALL_DECODER (6.3-12.1 s vs 0.14-0.36 s, 96 px, batch 16, 2 busy cores).
        decoder = {} if paper else SMALL_DECODER
        grid = {"method": [dict(label=m, method=m, **(decoder if m == "mae" else {})) for m in methods]}
        if b.unit != "epochs":  # three points along the way
            every = str(Budget(b.value / 4 if b.unit == "seconds" else max(1, int(b.value) // 4), b.unit))
    elif name == "table5":
        grid = {"design": [dict(label="beit", method="beit", windows=0),
                           dict(label=f"beit + windows {window['label']}", method="beit",
                                window_size=window["window_size"], windows=window["windows"])]}
        notes.append(f"Table 5: BEiT on its own recipe, globally and inside {window['label']} windows (blockwise "
                     f"masks scaled to the window); every other setting as the original BEiT.")
    elif name == "windows":
        grid, settings["method"] = {"window": pairs}, "lomar"
        if not paper:
            notes.append(f"Windows scaled from the paper's 14x14 grid to this {grid_side}x{grid_side} grid: size "
                         f"round(w * {grid_side} / 14) clamped to [2, {grid_side}], windows per image kept.")
    elif name == "mask-ratio":
        grid, settings["method"] = {"mask_ratio": list(MASK_RATIOS)}, "lomar"
    elif name == "pos":
        grid, settings["method"] = {"pos": ["rpe", "abs"]}, "lomar"
    else:  # enc-dec
        same = dict(window_size=window["window_size"], windows=window["windows"], mask_ratio=0.8)
        decoder = {} if paper else SMALL_DECODER
        grid = {"design": [dict(label="lomar (encoder, windows)", method="lomar", **same),
                           dict(label="mae (encoder-decoder, windows)", method="mae", **same, **decoder),
                           dict(label="mae (encoder-decoder, global)", method="mae", windows=0, **decoder)]}
        notes.append(f"Windows {window['label']}, 80 % of each window masked, for LoMaR and windowed MAE alike; "
                     f"global MAE masks its default 75 % of the image. MAE's decoder: "
                     f"{decoder or 'MAE-base (512 wide, 8 blocks, 16 heads)'}.")
    raw = dict(name=name, budget=budget, seeds=seeds or 1, slice=PAPER_SLICE if paper else "10s",
               settings=settings, grid=grid, data=section,
               eval={"metrics": metrics, "img_size": settings["img_size"], "every": every})
    if not metrics:
        notes.append("No labelled train/ and val/ folders: the table shows the training loss only.")
    return parse_spec(raw, f"--preset {name}", notes=notes)


def describe(spec: StudySpec) -> str:
    """A preset's settings as YAML: what ``--scale paper`` prints (shared settings, grid, budget, notes)."""
    import yaml

    methods = dict.fromkeys(cell.settings.get("method", "lomar") for cell in spec.cells())
    text = yaml.safe_dump({"preset": spec.name, "budget": str(spec.budget), "seeds": spec.seeds,
                           "settings": spec.settings,
                           "grid": {axis: [{"label": label, **values} for label, values in points]
                                    for axis, points in spec.grid.items()},
                           "metrics": list(spec.eval.metrics),
                           # the budget, not a recipe's epochs, sets every cell's length
                           "recipes": {m: {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in method_recipe(m).items() if k != "epochs"} for m in methods}},
                          sort_keys=False)
    return text + "".join(f"# {note}\n" for note in spec.notes)
