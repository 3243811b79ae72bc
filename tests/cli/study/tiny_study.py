"""A tiny study's settings and its spec, for the study tests."""

from pathlib import Path

# helpers.TINY as study settings: 2 blocks, 32 wide, 32 px, 3x3 windows, 2 per image.
TINY = dict(model="vit_tiny_patch8", embed_dim=32, depth=2, num_heads=2, img_size=32, window_size=3, windows=2,
            batch_size=4, epochs=100_000, workers=0, threads=1, log_every=1, device="cpu", lr=1e-3,
            warmup_epochs=0.5, precision="fp32", save_every=100, figure_images=1)


def _spec(root: Path, **changes) -> dict:
    raw = dict(name="tiny", budget="4steps", seeds=1, slice="1s", settings=TINY,
               grid={"method": ["lomar", "mae"]}, random_init=True,
               data={"pretrain": str(root / "train"), "train": str(root / "train"), "val": str(root / "val")},
               eval={"every": "2steps", "metrics": ["knn", "heldout_loss"], "knn": {"k": 3}, "equal_steps": True})
    raw.update(changes)
    return raw
