"""A real-data check that pretraining helps: scikit-learn's handwritten digits, on CPU.

1,797 real 8x8 scans of digits (10 classes, shipped inside scikit-learn), upsampled to 32x32
(3 channels), split 75/25 stratified with a fixed seed. A tiny ViT (patch 4 -> 8x8 grid) is
pretrained with LoMaR and with MAE for the same wall-clock budget, then its frozen features
(mean of the normed patch tokens) are scored by a linear probe and by k-NN, against randomly
initialised encoders, over 3 seeds. Every hyperparameter is fixed in this file a priori;
nothing is tuned on the validation split.

    python benchmarks/digits.py                 # full run: 3 seeds x 110 s x 2 methods, ~14 min
    python benchmarks/digits.py --budget 10 --seeds 0 --out /tmp/digits   # a quick look
    python benchmarks/digits.py --steps 300     # fixed step count instead of a time budget

Fair clock: LoMaR and MAE of one seed train in alternating ~2 s slices until each has used
its budget, so load from other processes on a shared machine hits both alike.
Determinism: for a seed, the sequence of batches, masks and updates is fixed; with a time
budget only the number of steps reached depends on the machine (use ``--steps`` to fix it).
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the reported wall time includes the imports

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from lomar import MAE, LoMaR, VisionTransformer, ViTConfig
from lomar.eval.features import extract_features
from lomar.eval.knn import knn_predict
from lomar.eval.linear_probe import train_linear_probe
from lomar.train.runtime import fast_adamw, retain_freed_memory

# Encoder: ViT with patch 4 on 32x32 -> an 8x8 grid of 64 tokens, width 64, 4 blocks, 4 heads.
ENCODER = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
# LoMaR: 5x5 windows on the 8x8 grid (16 possible positions). The paper's 7x7 window covers a
# quarter of a 14x14 grid; 5x5 covers 39% of 8x8, the nearest odd size that still leaves a window
# room to move (6x6 would be 9 positions, 7x7 only 4). 4 windows x 5 visible tokens = 20 visible
# tokens per image, against MAE's 16 (25% of 64): comparable context for both methods.
LOMAR = dict(window_size=5, num_windows=4, mask_ratio=0.8)
# MAE: its recipe scaled down: decoder half the encoder width, 2 blocks (ViT-B: 512 wide, 8 deep).
MAE_SETTINGS = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mask_ratio=0.75)
# Pretraining: AdamW (0.9, 0.95), wd 0.05, linear warm-up then constant lr (a time budget has no
# known end for a cosine), batch 128, random shifts of up to 2 px per image.
BATCH, LR, WEIGHT_DECAY, WARMUP, SHIFT = 128, 1e-3, 0.05, 50, 2
# Evaluation: k-NN k=20, T=0.07; linear probe BatchNorm + Linear, AdamW lr 1e-2, 100 epochs.
KNN_K, KNN_T, PROBE_EPOCHS, PROBE_LR = 20, 0.07, 100, 1e-2
SLICE_S = 2.0


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, val_x, val_y); images (N, 3, 32, 32) standardised with train statistics."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    train, val = train_test_split(range(len(y)), test_size=0.25, stratify=digits.target, random_state=0)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[val], y[val]


def shift(images: torch.Tensor, gen: torch.Generator, max_px: int = SHIFT) -> torch.Tensor:
    """Translate every image independently by up to max_px pixels (background padding)."""
    n, _, h, w = images.shape
    padded = F.pad(images, [max_px] * 4, value=float(images.min()))
    offsets = torch.randint(0, 2 * max_px + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def build(method: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if method == "lomar":
        return LoMaR(ViTConfig(pos="rpe", **ENCODER), **LOMAR)
    if method == "mae":
        return MAE(ViTConfig(pos="abs", **ENCODER), **MAE_SETTINGS)
    return VisionTransformer(ViTConfig(pos="abs" if method == "random_abs" else "rpe", **ENCODER))


class Pretraining:
    """One model's pretraining, advanced a step at a time; its own data and mask generator."""

    def __init__(self, model: torch.nn.Module, train_x: torch.Tensor, seed: int):
        self.model, self.train_x = model.train(), train_x
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = fast_adamw(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
        self.steps, self.seconds, self.losses = 0, 0.0, []

    def step(self) -> None:
        idx = torch.randint(0, self.train_x.shape[0], (BATCH,), generator=self.gen)
        for group in self.opt.param_groups:
            group["lr"] = LR * min(1.0, (self.steps + 1) / WARMUP)
        loss = self.model(shift(self.train_x[idx], self.gen), generator=self.gen).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        self.losses.append(float(loss.detach()))

    def info(self) -> dict:
        tail = self.losses[-20:]
        return {"steps": self.steps, "seconds": round(self.seconds, 1),
                "first_loss": round(self.losses[0], 4) if self.losses else None,
                "final_loss": round(statistics.fmean(tail), 4) if tail else None}


def pretrain_pair(runs: list[Pretraining], budget: float | None, steps: int | None) -> None:
    """Advance every run until it has used ``budget`` seconds (or made ``steps`` steps),
    in alternating slices so that the machine's load falls on all of them alike."""
    def done(run: Pretraining) -> bool:
        return run.steps >= steps if steps else run.seconds >= budget

    while not all(done(r) for r in runs):
        for run in runs:
            slice_start = time.perf_counter()
            while not done(run) and time.perf_counter() - slice_start < SLICE_S:
                start = time.perf_counter()
                run.step()
                run.seconds += time.perf_counter() - start  # per step: a slice never overshoots the budget


def evaluate(encoder, train_x, train_y, val_x, val_y, seed: int) -> dict[str, float]:
    def loader(x, y):
        return DataLoader(TensorDataset(x, y), batch_size=256)

    tr_f, tr_y = extract_features(encoder, loader(train_x, train_y))
    va_f, va_y = extract_features(encoder, loader(val_x, val_y))
    return _score(tr_f, tr_y, va_f, va_y, seed)


def _score(tr_f, tr_y, va_f, va_y, seed: int) -> dict[str, float]:
    pred = knn_predict(tr_f, tr_y, va_f, 10, k=KNN_K, temperature=KNN_T).argmax(1)
    _, probe = train_linear_probe(tr_f, tr_y, va_f, va_y, epochs=PROBE_EPOCHS, lr=PROBE_LR, seed=seed)
    return {"linear_probe": round(probe, 4), "knn": round(float((pred == va_y).float().mean()), 4)}


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f}"


def write_report(out: Path, args, results: dict, runs: list[dict], extra: dict, meta: dict) -> None:
    (out / "digits.json").write_text(json.dumps(results, indent=2) + "\n")
    clock = f"--steps {args.steps}" if args.steps else f"--budget {args.budget:g}"
    names = {"lomar": "LoMaR (pretrained)", "mae": "MAE (pretrained)", "random": "random init (LoMaR's ViT, RPE)",
             "random_abs": "random init (MAE's ViT, sin-cos)", "pixels": "raw pixels (32x32x3, no encoder)"}
    lines = [
        "# Digits: does pretraining help? (real data, CPU)", "",
        f"Command: `python benchmarks/digits.py {clock} --seeds {' '.join(map(str, args.seeds))}` "
        f"(also `make digits`), {meta['wall_min']:.1f} min in all.", "",
        "| encoder | linear probe top-1 (%) | k-NN top-1 (%) | pretraining steps per seed |",
        "| --- | --- | --- | --- |",
    ]
    for method, scores in [*results.items(), *extra.items()]:
        steps = ", ".join(str(r["steps"]) for r in runs if r["method"] == method) or "–"
        lines.append(f"| {names[method]} | {_mean_std(scores['linear_probe'])} | {_mean_std(scores['knn'])} "
                     f"| {steps} |")
    lines += [
        "", "Mean ± sample standard deviation over the seeds; `digits.json` holds the per-seed values of "
        "the first three rows (keys `lomar`, `mae`, `random`). The last two rows are context only.", "",
        "## Settings (fixed before running; nothing tuned on the validation split)", "",
        f"- Data: scikit-learn `load_digits` (1,797 real 8x8 scans, 10 classes), bilinear upsampling to "
        f"32x32, grey copied to 3 channels, standardised with the training split's mean and std; stratified "
        f"75/25 split, `random_state=0`: {meta['train']} train / {meta['val']} val images.",
        f"- Encoder: ViT patch 4 (8x8 grid), width {ENCODER['embed_dim']}, depth {ENCODER['depth']}, "
        f"{ENCODER['num_heads']} heads, MLP ratio 4 ({meta['encoder_params'] / 1e3:.0f} k parameters).",
        f"- LoMaR: contextual RPE, {LOMAR['window_size']}x{LOMAR['window_size']} windows, "
        f"{LOMAR['num_windows']} per image, {int(LOMAR['mask_ratio'] * 100)}% of each window masked "
        f"(20 of 25 tokens), linear pixel head. 5x5 is the odd window size that leaves a window room to move on "
        f"an 8x8 grid (16 positions) while covering a similar share of it as 7x7 does of 14x14; 4 windows x 5 "
        f"visible tokens = 20 visible tokens per image, near MAE's 16.",
        f"- MAE: fixed 2-D sin-cos positions, {int(MAE_SETTINGS['mask_ratio'] * 100)}% of the 64 tokens "
        f"masked, decoder {MAE_SETTINGS['decoder_embed_dim']} wide x {MAE_SETTINGS['decoder_depth']} blocks x "
        f"{MAE_SETTINGS['decoder_num_heads']} heads (the recipe's decoder scaled down with the encoder).",
        f"- Pretraining, both: normalised-pixel loss on masked tokens; AdamW betas (0.9, 0.95), weight decay "
        f"{WEIGHT_DECAY}, lr {LR} after a {WARMUP}-step linear warm-up (constant after: a time budget has no "
        f"known end for a cosine), batch {BATCH} drawn with replacement, each image shifted by up to {SHIFT} px. "
        + (f"{args.steps} steps each." if args.steps else
           f"The same wall-clock budget each, {args.budget:g} s per seed, spent in alternating "
           f"{SLICE_S:g} s slices (LoMaR, MAE, LoMaR, …) so that load from other processes hits both alike."),
        "- Features: the mean of the encoder's normed patch tokens on the un-augmented 32x32 images, frozen "
        "(LoMaR never trains its cls token to summarise an image, so all encoders are read the same way).",
        f"- k-NN: cosine similarity, k={KNN_K}, votes weighted exp(sim/{KNN_T}), train → val. Linear probe: "
        f"BatchNorm1d without affine + Linear, AdamW lr {PROBE_LR} cosine to 0, {PROBE_EPOCHS} epochs, batch "
        f"256, no weight decay, on the cached features.",
        f"- Seeds {', '.join(map(str, args.seeds))}: each seeds the model initialisation, the batches, masks "
        f"and shifts, and the probe.",
        f"- Machine: {meta['machine']}; torch {torch.__version__}, fp32, {args.threads} thread(s); load average "
        f"{meta['load_start']} at the start and {meta['load_end']} at the end (1-minute averages; this run "
        f"itself keeps {args.threads} thread(s) busy, more than that is other load, which the alternating "
        f"slices share between the methods; the step counts reached depend on it).",
        "", "## Per-run details", "", "```",
        *[json.dumps(r) for r in runs], "```", "",
    ]
    (out / "digits.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=110.0, help="pretraining seconds per method and seed")
    parser.add_argument("--steps", type=int, help="pretrain this many steps instead of a time budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for digits.md / digits.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, val_x, val_y = load_data()
    meta = {"train": len(train_y), "val": len(val_y), "load_start": os.getloadavg()[0].__round__(1),
            "machine": f"{os.cpu_count()} CPU cores",
            "encoder_params": sum(p.numel() for p in build("random", 0).parameters())}
    results = {m: {"linear_probe": [], "knn": []} for m in ("lomar", "mae", "random")}
    extra = {m: {"linear_probe": [], "knn": []} for m in ("random_abs", "pixels")}
    runs: list[dict] = []
    for seed in args.seeds:
        models = {m: build(m, seed) for m in ("lomar", "mae")}
        trainings = {m: Pretraining(model, train_x, seed) for m, model in models.items()}
        pretrain_pair(list(trainings.values()), args.budget, args.steps)
        for method in ("lomar", "mae", "random", "random_abs", "pixels"):
            if method == "pixels":
                scores = _score(train_x.flatten(1), train_y, val_x.flatten(1), val_y, seed)
            else:
                encoder = models[method].encoder if method in models else build(method, seed)
                scores = evaluate(encoder, train_x, train_y, val_x, val_y, seed)
            target = results if method in results else extra
            for key, value in scores.items():
                target[method][key].append(value)
            info = trainings[method].info() if method in trainings else {"steps": 0}
            runs.append({"method": method, "seed": seed, **info, **scores})
            print(json.dumps(runs[-1]), flush=True)
    meta["load_end"] = round(os.getloadavg()[0], 1)
    meta["wall_min"] = (time.perf_counter() - _START) / 60
    write_report(out, args, results, runs, extra, meta)
    print((out / "digits.md").read_text())


if __name__ == "__main__":
    main()
