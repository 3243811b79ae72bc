"""Test sets for the input-pipeline benchmarks: realistic JPEGs written from the bundled demo photographs (camera
size 4000×3000 or ImageNet size 500×375, quality 90). Torch-free: benchmarks/gpu_check.sh makes each set in a
process of its own, which starts in a fraction of a second instead of a torch import's seconds."""

from __future__ import annotations

import contextlib
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from lomar.checkpoints.own_names import TEMPORARY_SUFFIX, own_temporary
from lomar.data.demo_images import demo_image_paths

__all__ = ["TEST_SET_SIZES", "make_test_set"]

# (width, height) of each test-set kind.
TEST_SET_SIZES = {"camera": (4000, 3000), "imagenet": (500, 375)}


def _write_one(job: tuple[str, str, tuple[int, int], int, int]) -> str:
    src, dst, (width, height), quality, index = job
    with Image.open(src) as img:
        img = img.convert("RGB")
        # A different crop and orientation per file, so the set is not one photo repeated.
        w, h = img.size
        margin = index % 5 * 0.03
        img = img.crop((int(w * margin), int(h * margin), w - int(w * margin / 2), h - int(h * margin / 2)))
        if index // len(TEST_SET_SIZES) % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    # a half-written file never carries the final name; the temporary is this writer's own (PID and random part):
    # another command writing the same set meanwhile, on this machine or on one sharing the folder, has its own
    tmp, fd = own_temporary(dst, mode=0o666)  # the umask's permissions, as any file the user makes
    try:
        with os.fdopen(fd, "wb") as handle:
            img.save(handle, format="JPEG", quality=quality)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename: after a power loss no empty file has the name
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):  # this writer's own temporary, and only it
            os.unlink(tmp)
        raise
    return dst


def make_test_set(out: str | Path, kind: str = "camera", count: int = 32, quality: int = 90,
                  processes: int | None = None) -> list[Path]:
    """Write ``count`` JPEGs of ``kind`` ("camera": 4000×3000, "imagenet": 500×375) into ``out``.

    The sources are scikit-image's demo photographs, resampled to the target size (mostly
    upsampled: smooth content, but the decoder's work depends on the pixel count and quality,
    which match real photos). Existing files of the same name are reused; ``out`` holds nothing else
    (ValueError otherwise).
    """
    if kind not in TEST_SET_SIZES:
        raise ValueError(f"unknown test-set kind {kind!r}; choose one of {', '.join(TEST_SET_SIZES)}")
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    ours = re.compile(rf"({'|'.join(TEST_SET_SIZES)})-\d{{5}}\.jpg")
    if Path(out).is_dir() and (other := next((e.name for e in os.scandir(out) if not ours.fullmatch(e.name)), None)):
        if re.fullmatch(rf"\.({ours.pattern}){TEMPORARY_SUFFIX}", other):  # _write_one's own temporary
            raise ValueError(f"{out} holds {other}, a test-set file another command is writing or a killed one "
                             f"left; delete it once no other command writes the set, then rerun")
        # a dataset's folder would get synthetic photos among its own, and the benchmark would read both
        raise ValueError(f"{out} holds {other}, which is not a test-set file; the test set is written into a folder "
                         f"of its own: pass a new or empty one")

    sources = demo_image_paths()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, paths = [], []
    for i in range(count):
        dst = out / f"{kind}-{i:05d}.jpg"
        paths.append(dst)
        if not dst.exists():
            jobs.append((str(sources[i % len(sources)]), str(dst), TEST_SET_SIZES[kind], quality, i))
    workers = min(len(jobs), processes or os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        list((pool.map if pool else map)(_write_one, jobs))
    return paths
