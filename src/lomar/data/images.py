"""Pretraining data: finding images, decoding them robustly, augmenting them reproducibly.

Every random choice for a sample (its crop, its flip, its masking) comes from a generator
seeded by (run seed, epoch, sample index). A sample is therefore the same whichever worker
loads it, however many processes share the batch, and after any resume.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "denormalize", "demo_image_paths",
    "build_image_list", "load_image", "decode_bytes", "sample_generator", "PretrainTransform",
    "ImageListDataset", "build_pretrain_dataset", "collate_pretrain", "BadDataTracker",
]

log = logging.getLogger("lomar.data.images")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Real photographs that ship inside scikit-image's wheel (no download needed).
_DEMO_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
               "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
               "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png")

Masker = Callable[[torch.Generator], dict[str, torch.Tensor]]


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (N, 3, H, W) -> pixels in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def demo_image_paths() -> list[Path]:
    """The sample photographs bundled with scikit-image."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    paths = [root / name for name in _DEMO_FILES if (root / name).is_file()]
    if not paths:
        raise ValueError(f"no demo images found in {root}; reinstall scikit-image or pass --data")
    return paths


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def build_image_list(data: str | Path) -> list[Path]:
    """Image paths of a folder (searched recursively) or of a .txt list, sorted."""
    path = Path(data)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist; pass a folder of images, a .txt list "
                         f"of image paths or a tar shard pattern")
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise ValueError(f"{path} is a file but not a .txt list of images; pass its folder instead")
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        images = [Path(ln) if Path(ln).is_absolute() else path.parent / ln
                  for ln in lines if ln and not ln.startswith("#")]
    else:
        images = sorted(p for p in path.rglob("*") if _is_image_name(p.name) and p.is_file())
    if not images:
        shards = path.is_dir() and any(path.glob("*.tar"))
        hint = (f"for tar shards pass a pattern such as {path / '*.tar'}" if shards
                else f"supported extensions: {', '.join(IMAGE_EXTENSIONS)}")
        raise ValueError(f"no images found in {path}; {hint}")
    return images


def _pil_decode(data: bytes) -> torch.Tensor:
    """Pillow fallback for what torchvision cannot decode (CMYK, 16-bit, odd modes)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0
            img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def decode_bytes(data: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, H, W) RGB; ValueError when undecodable."""
    if not data:
        raise ValueError(f"{name} is empty (0 bytes)")
    try:
        # torchvision 0.29 announces a move of its decoders to torchcodec; they work, and Pillow is
        # the fallback, so the notice would only be noise in every worker (filtered here, not globally)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image  # lazy: torchvision costs ~20 s to import

            # EXIF orientation: phone photos are often stored sideways with a rotation tag.
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                 apply_exif_orientation=True)
        if image.dtype != torch.uint8:  # 16-bit PNG
            image = (image.to(torch.int32) >> 8).to(torch.uint8)
        if image.ndim == 4:  # animated GIF: first frame
            image = image[0]
        if image.shape[0] == 3 and image.numel() > 0:
            return image
    except Exception:  # torchvision refuses: try Pillow below
        pass
    try:
        return _pil_decode(data)
    except Exception as exc:
        raise ValueError(f"cannot decode image {name}: {exc}") from exc


def load_image(path: str | Path) -> torch.Tensor:
    """Read and decode an image file: uint8 (3, H, W) RGB; ValueError when unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_bytes(data, str(path))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that is a pure function of (seed, epoch, index)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class PretrainTransform:
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip + ImageNet normalisation.

    Crops in uint8 before resizing, so a large image is never copied at full size as floats.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def crop_box(self, height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w), distributed as torchvision's RandomResizedCrop.get_params."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(3, generator=gen).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return top, left, h, w
        # Fallback: central crop at the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (3, size, size), normalised."""
        top, left, h, w = self.crop_box(image.shape[-2], image.shape[-1], gen)
        from torchvision.transforms.v2 import functional as TF

        crop = TF.resized_crop(image, top, left, h, w, [self.size, self.size],
                               interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if self.flip and bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        return (crop.float() / 255.0 - self.mean) / self.std


def _make_item(path: str, decode: Callable[[], torch.Tensor], transform: PretrainTransform,
               gen: torch.Generator, masker: Masker | None) -> dict:
    try:
        image = transform(decode(), gen)
    except (ValueError, RuntimeError, OSError) as exc:
        log.debug("skipping %s: %s", path, exc)
        # The size lets the collate shape an all-bad batch as (0, 3, S, S).
        return {"image": None, "path": path, "size": transform.size}
    item = {"image": image, "path": path}
    if masker is not None:
        item.update(masker(gen))
    return item


class ImageListDataset(Dataset):
    """Map-style dataset over image files; keys are ``(index, epoch)`` (an int means epoch 0).

    Items: ``{"image": (3, S, S) float32 or None if unreadable, "path": str, **masker(gen)}``.
    """

    def __init__(self, paths: list[Path], transform: PretrainTransform, seed: int = 0,
                 masker: Masker | None = None, repeats: int = 1, cache_decoded: bool = False):
        self.paths, self.transform, self.seed, self.masker = list(paths), transform, seed, masker
        self.repeats = repeats  # the tiny demo set shows each photo several times per epoch
        # Decoded uint8 images kept per process (each loader worker fills its own): only for
        # small sets such as the demo, where decoding the same photos again dominates a step.
        self.decoded: dict[int, torch.Tensor] | None = {} if cache_decoded else None

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # Keys may arrive as numpy or tensor integers from custom samplers: normalise to int.
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        path = self.paths[index % len(self.paths)]
        gen = sample_generator(self.seed, epoch, index)
        return _make_item(str(path), lambda: self._load(index % len(self.paths)), self.transform, gen, self.masker)

    def _load(self, i: int) -> torch.Tensor:
        if self.decoded is None:
            return load_image(self.paths[i])
        if i not in self.decoded:
            self.decoded[i] = load_image(self.paths[i])
        return self.decoded[i]


def build_pretrain_dataset(data: str | None, img_size: int, seed: int = 0,
                           scale: tuple[float, float] = (0.2, 1.0), masker: Masker | None = None,
                           rank: int | None = None, world_size: int | None = None,
                           demo_repeats: int = 8) -> Dataset:
    """The pretraining dataset for ``--data`` (None: the built-in demo photographs).

    A folder or .txt list gives a map-style :class:`ImageListDataset`; a ``.tar`` glob or brace
    pattern gives an iterable :class:`lomar.data.shards.TarShardDataset`. ``rank``/``world_size``
    split tar shards between processes (None: from torch.distributed); map-style datasets are
    split by the engine's sampler instead.
    """
    transform = PretrainTransform(img_size, scale)
    if data is None:
        return ImageListDataset(demo_image_paths(), transform, seed, masker, repeats=demo_repeats,
                                cache_decoded=True)
    from lomar.data.shards import TarShardDataset, is_shard_pattern, shard_paths  # shards imports this module

    if is_shard_pattern(str(data)):
        return TarShardDataset(shard_paths(str(data)), transform, seed, masker, rank, world_size)
    return ImageListDataset(build_image_list(data), transform, seed, masker)


def collate_pretrain(batch: list[dict]) -> dict:
    """Stack the readable items; report the unreadable ones' paths under ``"bad"``.

    -> {"images": (B', 3, S, S), "bad": [paths], **other stacked fields}; B' may be 0.
    """
    good = [item for item in batch if item["image"] is not None]
    out: dict = {"bad": [item["path"] for item in batch if item["image"] is None],
                 "paths": [item["path"] for item in good]}
    if not good:
        size = batch[0].get("size", 0) if batch else 0
        out["images"] = torch.empty(0, 3, size, size)
        return out
    for key in good[0]:
        if key not in ("path", "size"):
            out["images" if key == "image" else key] = torch.stack([item[key] for item in good])
    return out


class BadDataTracker:
    """Counts unreadable files; logs each once; fails the run when too many are bad.

    With ``total`` (the files this process reads per epoch) the rule is exact: stop once the
    distinct bad files exceed ``threshold`` of them, which is certain however the files are
    ordered, and is known by the end of the first epoch at the latest. A running share of the
    batches seen so far would stop runs with 5-8 % bad files by chance (13-54 % of them, by
    simulation). Without ``total``, that running share is the fallback, from ``min_seen`` on.
    """

    def __init__(self, total: int | None = None, min_seen: int = 20):
        self.bad: dict[str, None] = {}
        self.seen = 0
        self.failures = 0
        self.total = total
        self.min_seen = min_seen

    @property
    def count(self) -> int:
        return len(self.bad)

    @property
    def fraction(self) -> float:
        return self.failures / max(1, self.seen)

    def update(self, bad_paths: list[str], seen: int) -> None:
        """``seen``: items in the batch, bad ones included."""
        self.seen += seen
        self.failures += len(bad_paths)
        for path in bad_paths:
            if path not in self.bad:
                self.bad[path] = None
                log.warning("skipped unreadable image %s", path)

    def check(self, threshold: float = 0.1) -> None:
        if self.total:
            if self.count > threshold * self.total:
                raise ValueError(
                    f"{self.count} of {self.total} images (over {100 * threshold:.0f}%) could not be read, "
                    f"e.g. {next(iter(self.bad))}; fix or remove them")
        elif self.seen >= self.min_seen and self.fraction > threshold:
            raise ValueError(
                f"{self.failures} of {self.seen} images ({100 * self.fraction:.0f}%) could not be read, "
                f"e.g. {next(iter(self.bad))}; fix or remove them")


def __getattr__(name: str):
    # TarShardDataset lives in lomar.data.shards (it imports this module); keep the old import path.
    if name == "TarShardDataset":
        from lomar.data.shards import TarShardDataset

        return TarShardDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
