"""The sample photographs bundled with scikit-image: the demo preset's data and the source of the benchmarks' test
sets. Torch-free: a process that only writes a test set starts in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

__all__ = ["demo_image_paths"]

# Real photographs that ship inside scikit-image's wheel (no download needed).
_DEMO_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
               "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
               "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png")


def demo_image_paths() -> list[Path]:
    """The sample photographs bundled with scikit-image."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    paths = [root / name for name in _DEMO_FILES if (root / name).is_file()]
    if not paths:
        raise ValueError(f"no demo images found in {root}; reinstall scikit-image or pass --data")
    return paths
