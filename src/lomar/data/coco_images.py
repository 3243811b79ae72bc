"""A COCO split's images checked from their headers, before any training: an evaluation finds an image that
cannot be read, or whose upright size is not the one its annotations are for, only when it reads it, after
the first epoch (hours into a COCO run), and then scores without it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lomar.data.coco import CocoSplit, size_mismatch
from lomar.data.collate import UNREADABLE_LIMIT
from lomar.data.decode import open_pil, oriented_size, read_image_bytes
from lomar.data.image_errors import ImageFileError
from lomar.errors import UsageError, exception_line

__all__ = ["unusable_image", "check_split_images"]


def unusable_image(split: CocoSplit, image: dict) -> str | None:
    """Why ``image`` (an entry of ``split``'s images) cannot be used, in the words the loader's warning uses;
    None when its header reads and gives the size the file does (EXIF orientation applied)."""
    path = Path(split.root) / str(image["file_name"])
    try:
        with open_pil(read_image_bytes(path), str(path)) as opened:
            upright, stored = oriented_size(opened), opened.size[::-1]
    except ValueError as exc:  # open_pil's and read_image_bytes' name the file
        return exception_line(exc)
    except OSError as exc:  # oriented_size's, from a PNG decoded to look for EXIF after its pixels, name none
        return str(ImageFileError(path, exception_line(exc)))
    if upright != (round(image["height"]), round(image["width"])):
        return size_mismatch(path, upright, stored, split.path, image["width"], image["height"])
    return None


def check_split_images(split: CocoSplit, flag: str, workers: int = 1) -> None:
    """A UsageError when more than :data:`~lomar.data.collate.UNREADABLE_LIMIT` of ``split``'s images cannot be
    used (a score over part of a split is not the split's score); ``flag`` names the image folder's option.
    Fewer are left to the loader, which skips each with a warning."""
    images = split.data["images"]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = [why for why in pool.map(lambda image: unusable_image(split, image), images) if why]
    if len(reasons) > UNREADABLE_LIMIT * len(images):
        raise UsageError(f"{len(reasons)} of the {len(images)} images {split.path} lists (over "
                         f"{UNREADABLE_LIMIT:.0%}) cannot be used, e.g. {reasons[0]}; pass the folder of the images "
                         f"it was written for as {flag}, or fix the file")
