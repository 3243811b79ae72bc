"""The map-style datasets: pretraining image lists (a folder searched, :mod:`lomar.data.image_search`, or a .txt
list), labelled class folders."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lomar.data.class_names import classes_only_in, unicode_forms_note
from lomar.data.class_roots import not_a_class_root
from lomar.data.collate import LabelledItem
from lomar.data.decode import load_image, load_image_reduced, tensor_to_pil
from lomar.data.decode_check import check_image
from lomar.data.demo_images import demo_image_paths
from lomar.data.image_names import (
    IMAGE_EXTENSIONS,
    SYSTEM_FOLDERS,
    THUMBNAIL_FOLDERS,
    is_image_name,
    passed_over_folder,
)
from lomar.data.image_search import image_table, search_images, warn_passed_over
from lomar.data.pathtable import PathTable, join_text
from lomar.data.shards import SHARD_SUFFIXES, TarShardDataset, is_shard_pattern, shard_paths
from lomar.data.transforms import Masker, PretrainTransform, make_item, sample_generator, sample_key
from lomar.errors import exception_line
from lomar.values import counted

__all__ = ["build_image_list", "ImageListDataset", "build_pretrain_dataset", "LabelledImageFolder"]

log = logging.getLogger("lomar.data")


def _without_junk(listing: Path, paths: list[str]) -> list[str]:
    """``paths`` of a .txt list less macOS's ``._NAME`` files and what lies in thumbnail caches or system folders
    (:data:`SYSTEM_FOLDERS`) below the list's own folder, as a folder search judges only what is below its root, said
    in one line: ``find DIR -name '*.jpg'`` lists them as a folder search meets them (an AppleDouble file beside each
    photo copied from a Mac: half the list unreadable, stopped at the 10 % rule; a NAS's deleted photos, snapshots)."""
    marks = (f"{os.sep}._", *(f"{os.sep}{name}{os.sep}" for name in THUMBNAIL_FOLDERS + SYSTEM_FOLDERS))
    whole = os.sep + f"\n{os.sep}".join(paths)  # one search of the whole list: the usual list holds none
    if not any(mark in whole for mark in marks):
        return paths
    base = str(listing.parent).rstrip(os.sep) + os.sep  # a list kept in a NAS's #snapshot copy names its photos
    junk = {i for i, text in enumerate(paths) if (os.sep + text).rpartition(os.sep)[2].startswith("._")
            or any(mark in os.sep + text[len(base) if text.startswith(base) else 0:] for mark in marks[1:])}
    if junk:
        log.warning("%s: %d line(s) name macOS metadata files (._NAME) or files in thumbnail or system folders (%s), "
                    "e.g. %s; left out, as a folder search leaves them out", listing, len(junk),
                    ", ".join(THUMBNAIL_FOLDERS + SYSTEM_FOLDERS), paths[min(junk)])
    return [text for i, text in enumerate(paths) if i not in junk]


def build_image_list(data: str | Path) -> PathTable:
    """Image paths of a folder (searched recursively, sorted) or of a .txt list (in its order), as a
    :class:`PathTable` (a sequence of Paths that loader workers read without copying it).

    Entries are not opened here: one that is not a regular file (a FIFO, a device) or is too
    large is refused when read (:func:`lomar.data.decode.read_image_bytes`), skipped and counted.
    """
    path = Path(data)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist; pass a folder of images, a .txt list "
                         f"of image paths or a tar shard pattern")
    if not path.is_file() and not path.is_dir():  # a FIFO would block the read, a device stream forever
        raise ValueError(f"data path {path} is neither a folder nor a regular file; pass a folder of images, "
                         f"a .txt list of image paths or a tar shard pattern")
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise ValueError(f"{path} is a file but not a .txt list of images; pass its folder instead")
        try:
            lines = _path_lines(path)
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a UTF-8 text list of image paths; pass a .txt with one path a line, "
                             f"or the folder of the images") from None
        folder = str(path.parent)
        listed = [join_text(folder, ln) for ln in lines]
        images = PathTable(_without_junk(path, listed))
    else:
        images = image_table(path)
        held_out = [name for name in ("val", "validation", "test") if (path / name).is_dir()]
        if (path / "train").is_dir() and held_out:  # ImageNet's root: its val images would be trained on too
            log.warning("%s holds train/ and %s/: every image under it is read, %s/ included; pass %s to leave "
                        "the held-out images out", path, held_out[0], held_out[0], path / "train")
    if not images:
        shards = [suffix for suffix in SHARD_SUFFIXES if path.is_dir() and any(path.glob(f"*{suffix}"))]
        hint = (f"for tar shards pass a pattern such as {path / ('*' + shards[0])}" if shards
                else f"supported extensions: {', '.join(IMAGE_EXTENSIONS)}")
        raise ValueError(f"no images found in {path}; {hint}")
    return images


class ImageListDataset(Dataset):
    """Map-style dataset over image files; keys are ``(index, epoch)`` (an int means epoch 0).

    Items: ``{"image": (3, S, S) float32 or None if unreadable, "path": str, "source": (2,) the image's (height,
    width), **masker(gen)}`` (:func:`lomar.data.transforms.make_item`).
    """

    def __init__(self, paths: Sequence[Path], transform: PretrainTransform, seed: int = 0,
                 masker: Masker | None = None, repeats: int = 1, cache_decoded: bool = False):
        self.paths = paths if isinstance(paths, PathTable) else PathTable(paths)  # see lomar.data.pathtable
        self.transform, self.seed, self.masker = transform, seed, masker
        self.repeats = repeats  # the tiny demo set shows each photo several times per epoch
        # Decoded uint8 images kept per process (each loader worker fills its own): only for
        # small sets such as the demo, where decoding the same photos again dominates a step.
        self.decoded: dict[int, torch.Tensor] | None = {} if cache_decoded else None

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, path, gen = self.sample(key)
        return make_item(path, lambda: self._load(i), self.transform, gen, self.masker)

    def sample(self, key: int | tuple[int, int]) -> tuple[int, str, torch.Generator]:
        """(file index, path, generator seeded by (seed, epoch, index)) of sample ``key``: what every
        decode path of :mod:`lomar.data.fast_decode` reads and draws from."""
        index, epoch = sample_key(key)
        i = index % len(self.paths)
        return i, self.paths.text(i), sample_generator(self.seed, epoch, index)

    def _load(self, i: int) -> torch.Tensor:
        if self.decoded is None:
            return load_image(self.paths.text(i))
        if i not in self.decoded:
            self.decoded[i] = load_image(self.paths.text(i))
        return self.decoded[i]


def build_pretrain_dataset(data: str | None, img_size: int, seed: int = 0,
                           scale: tuple[float, float] = (0.2, 1.0), masker: Masker | None = None,
                           rank: int | None = None, world_size: int | None = None,
                           demo_repeats: int = 8, color_jitter: float = 0.0) -> Dataset:
    """The pretraining dataset for ``--data`` (None: the built-in demo photographs).

    A folder or .txt list gives a map-style :class:`ImageListDataset`; a ``.tar`` glob or brace
    pattern gives an iterable :class:`lomar.data.shards.TarShardDataset`. ``rank``/``world_size``
    split tar shards between processes (None: from torch.distributed); map-style datasets are
    split by the engine's sampler instead.
    """
    transform = PretrainTransform(img_size, scale, color_jitter=color_jitter)
    if data is None:
        return ImageListDataset(demo_image_paths(), transform, seed, masker, repeats=demo_repeats, cache_decoded=True)
    if is_shard_pattern(str(data)):
        return TarShardDataset(shard_paths(str(data)), transform, seed, masker, rank, world_size)
    images = build_image_list(data)
    if Path(data).is_file():
        _check_listed(Path(data), images)
    return ImageListDataset(images, transform, seed, masker)


def _check_listed(listing: Path, images: Sequence[Path], first: int = 20) -> None:
    """ValueError when none of the first ``first`` paths of a .txt list exists: a list of another form (``path
    label`` lines) or read from another folder, which would otherwise be found out as a whole epoch of
    unreadable images. Some missing ones are skipped and counted when read, as any unreadable image."""
    if any(os.path.exists(path) for path in images[:first]):
        return
    parts = str(images[0]).rsplit(None, 1)
    labels = len(parts) == 2 and os.path.exists(parts[0])  # ImageNet's train.txt: 'n01440764/x.JPEG 0'
    line = next(iter(_path_lines(listing)), "")  # as written: joined, a quote or a '~' hides behind the folder
    hint = ("its lines look like 'path label': list one path a line, without labels" if labels else
            "its paths are separated by '\\', as Windows writes them: separate them by '/'" if "\\" in str(images[0])
            and os.sep == "/" else
            "its paths are in quotes: write them without quotes (a path with spaces needs none)"
            if len(line) > 1 and line[0] in "\"'" and line[-1] == line[0] else
            f"'~' is not expanded in a list: write the home folder out ({os.path.expanduser('~')}/...)"
            if line.startswith("~") else
            "its lines are URLs: list the files' local paths (a file:// URL without its 'file://')"
            if "://" in line else f"relative paths are read from the list's folder {listing.parent}")
    raise ValueError(f"{listing}: none of its first {min(first, len(images))} paths exists, e.g. {images[0]}; "
                     f"{hint}")


def _path_lines(listing: Path) -> list[str]:
    """The path lines of a .txt list as written, stripped: blank lines and ``#`` comments left out."""
    # -sig: a byte order mark (Windows editors write one) is not part of the first path
    lines = (ln.strip() for ln in listing.read_text(encoding="utf-8-sig").splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _refuses_as_load_image(load) -> bool:
    """Whether ``load`` fails exactly where :func:`load_image` fails: itself, or :func:`load_image_reduced` at a
    ``min_side`` (which decodes whole, as load_image, wherever its reduced decode fails or is not taken). The 1/8-scale
    check decides for either; a ``max_pixels`` of its own is another limit than the check's."""
    return load is load_image or (isinstance(load, partial) and load.func is load_image_reduced and not load.args
                                  and load.keywords.keys() == {"min_side"})


class LabelledImageFolder(Dataset):
    """``ROOT/CLASS/**/IMAGE`` (torchvision's ImageFolder layout; hidden folders and thumbnail caches no class)
    that survives unreadable images.

    Items: ``(transform(PIL image of load(path)) or None if unreadable, class index, path)``, each a
    :class:`lomar.data.collate.LabelledItem` whose ``source`` is the (height, width) load gave; batch them with
    :func:`lomar.data.collate.collate_labelled`, which drops and reports the bad ones. ``classes``
    and ``targets`` are as in ImageFolder. Raises ValueError naming the root when it holds no
    class folder or no image. ``check``: a callable that raises where ``load`` raises, at less cost (default:
    :func:`lomar.data.decode_check.check_image` where ``load`` refuses what :func:`~lomar.data.decode.load_image`
    refuses: the default, ``load_image`` or :func:`~lomar.data.decode.load_image_reduced` given a ``min_side``, the
    full and ``--decode draft`` loads of finetune, knn and linprobe; else ``load``).
    """

    def __init__(self, root: str | Path, transform=None, load=None, check=None):
        self.root, self.transform, self.load = Path(root), transform, load or load_image  # looked up now, not at import
        self.check = check or (check_image if _refuses_as_load_image(self.load) else self.load)
        self.warned: set[int] = set()  # the unreadable files this process has warned of
        if not self.root.is_dir():
            raise ValueError(not_a_class_root(self.root))
        # hidden folders (Jupyter's .ipynb_checkpoints, a .git) and thumbnail caches (a Synology NAS's @eaDir in every
        # folder: a class of every image's thumbnails, in val too) are no classes: each would add an output, and
        # shift every class index after it
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        self.classes = [name for name in folders if not passed_over_folder(name)]
        if caches := [name for name in folders if name in THUMBNAIL_FOLDERS]:
            log.warning("%s: %d thumbnail folder(s) are no class, e.g. %s", self.root, len(caches), caches[0])
        if system := [name for name in folders if name in SYSTEM_FOLDERS]:
            log.warning("%s: %d recycle bin, snapshot or system folder(s) are no class, e.g. %s", self.root,
                        len(system), system[0])
        # a class folder linked to an unmounted disk leads nowhere: no class, in train and val alike, without a word
        if broken := sorted(e.name for e in os.scandir(self.root)
                            if e.is_symlink() and not os.path.exists(e.path) and not is_image_name(e.name)):
            log.warning("%s: %d link(s) lead nowhere, e.g. %s -> %s: no class; mount its target or fix the link",
                        self.root, len(broken), broken[0], os.readlink(self.root / broken[0]))
        if not self.classes:
            raise ValueError(f"{self.root} holds no class folders (ImageFolder layout: ROOT/CLASS/IMAGE)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        # searched class by class, said once for the split: a NAS's @eaDir in each of 1,000 class folders is one line
        passed_over = dict(loops=0, hidden=[], forks=0, hidden_files=[], unlisted=[], foreign=[], twice=[])
        paths, counts = [], []
        self.folders: dict[tuple[int, int], tuple[str, str]] = {}  # each folder searched: (its class, its path)
        shared: dict[tuple[str, str], tuple[str, str]] = {}  # (class, a later class) -> (a folder, its link)
        for name in self.classes:
            found, passed = search_images(self.root / name)
            for key, folder in passed.pop("folders"):
                if (first := self.folders.setdefault(key, (name, folder)))[0] != name:
                    shared.setdefault((first[0], name), (first[1], folder))
            paths += found
            counts.append(len(found))
            for key, value in passed.items():
                passed_over[key] += value
        warn_passed_over(self.root, passed_over)
        if shared:  # a link from one class folder to another's (torchvision's ImageFolder follows it without a word)
            (first, second), (folder, link) = next(iter(shared.items()))
            log.warning("%s: %d pair(s) of class folders reach one folder through a link, e.g. %s (class %s) is %s "
                        "(class %s): its images are samples of both classes, under two labels; remove the link, or "
                        "copy the images that belong to both", self.root, len(shared), link, second, folder, first)
        if not paths:
            raise ValueError(f"no images found in the class folders of {self.root}; "
                             f"supported extensions: {', '.join(IMAGE_EXTENSIONS)}")
        # packed, not a list of (Path, label) tuples: each loader worker would copy the pages of the tuples it
        # reads (lomar.data.pathtable); samples and targets, ImageFolder's lists, are made when asked for
        self.paths = PathTable(paths)
        self.labels = np.repeat(np.arange(len(self.classes), dtype=np.int64), counts)
        # what ImageFolder passes over without a word: images beside the class folders, classes without an image
        stray = sorted(e.name for e in os.scandir(self.root) if not e.is_dir() and is_image_name(e.name))
        if stray:
            log.warning("%s: %d image(s) outside the class folders, e.g. %s, are not used; move them into their "
                        "class folder (ImageFolder layout: ROOT/CLASS/IMAGE)", self.root, len(stray), stray[0])
        # said by whoever pairs the splits (match_classes, relabel): an empty training folder is no class, an empty
        # held-out one a class without a sample
        self.empty = [name for name, count in zip(self.classes, counts) if not count]

    def check_classes(self) -> None:
        """ValueError unless there are two classes with images to tell apart: with one, every score is 100 %."""
        if len(held := [name for name in self.classes if name not in self.empty]) < 2:
            more = f", and {counted(len(self.empty), 'class folder')} without an image" if self.empty else ""
            raise ValueError(f"{self.root} holds one class folder with images ({held[0] if held else 'none'}){more}; a "
                             f"classifier needs at least two (ImageFolder layout: ROOT/CLASS/IMAGE)")

    def drop_classes(self, names: Sequence[str]) -> None:
        """Leave out the class folders ``names`` and their images (none, or none readable): the others' labels close
        up."""
        dropped = frozenset(names)
        keep = [name for name in self.classes if name not in dropped]
        self.class_to_idx = {name: i for i, name in enumerate(keep)}
        self.labels = np.array([self.class_to_idx.get(name, -1) for name in self.classes], dtype=np.int64)[self.labels]
        if (self.labels < 0).any():  # a class of unreadable images: its files go too, or they would be read unlabelled
            kept = np.flatnonzero(self.labels >= 0)
            self.paths, self.labels = PathTable(self.paths.text(i) for i in kept), self.labels[kept]
        self.classes, self.empty = keep, [name for name in self.empty if name not in dropped]

    def unreadable_classes(self) -> dict[str, tuple[int, str]]:
        """{class: (its image count, why its first image cannot be read)} of the classes with images none of which this
        split's load reads (the error :meth:`__getitem__` skips a file for), as the split's ``check`` finds. Each
        class's images are tried in order up to the first that reads: one check a class where its first image reads,
        however many images it holds (a 12 MP JPEG: a 1/8-scale decode)."""
        found = {}
        # labels run class by class (np.repeat, kept in order by drop_classes): a class's images are one range
        labels, starts, counts = np.unique(self.labels, return_index=True, return_counts=True)
        for label, start, count in zip(labels.tolist(), starts.tolist(), counts.tolist()):
            first = None
            for index in range(start, start + count):
                try:
                    self.check(self.paths.text(index))
                    break
                except (ValueError, RuntimeError, OSError) as exc:
                    first = first or exception_line(exc)
            else:
                found[self.classes[label]] = (count, first)
        return found

    def match_classes(self, val: LabelledImageFolder) -> None:
        """Give this training split and ``val`` one class list, by the one rule of every classification command: a
        class is a training class folder that holds an image this split reads (:meth:`unreadable_classes`). A
        training folder without one is no class, in both splits (an output never trained on would be offered by
        predict, and a probe's row for it untrained); each is warned of by name. A held-out folder without an image
        stays a class with no held-out sample (warned of). ValueError naming the class folders that only one split
        holds (labels are indices), or a held-out folder with images whose training folder has none that reads (a
        class nothing teaches)."""
        if common := self.folders.keys() & val.folders.keys():  # val/cat linked to train/cat: scored on trained images
            shared = next((f"by nesting ({a} lies in {b})" for a, b in ((val.root, self.root), (self.root, val.root))
                        if a.resolve().is_relative_to(b.resolve())), "through links"), val.folders[min(common)][1]
            log.warning("%s and %s share %d folder(s) %s, e.g. %s: their images are trained on and scored; give the "
                        "held-out split images of its own", self.root, val.root, len(common), *shared)
        # a class whose training images all fail to decode teaches nothing, as an empty folder: the same rule; known
        # only by decoding, up to one readable image a class (unreadable_classes)
        unread = self.unreadable_classes()
        if untaught := [name for name in (*self.empty, *unread) if name in val.classes and name not in val.empty]:
            name = untaught[0]
            if name in unread:
                count, why = unread[name]
                raise ValueError(f"{self.root / name} holds {counted(count, 'image')}, none readable (e.g. {why}), "
                                 f"{val.root / name} holds some: a class with nothing to learn from; fix or replace "
                                 f"its training images, or remove both folders")
            raise ValueError(f"{self.root / name} holds no image, {val.root / name} holds some: a class "
                             f"with nothing to learn from; add its training images, or remove both folders")
        if unread:
            name, (count, why) = min(unread.items())
            log.warning("%s: %d class folder(s) without a readable training image, e.g. %s (%s, none readable: %s): "
                        "no class, in %s too; fix or replace its images or remove the folder", self.root, len(unread),
                        self.root / name, counted(count, "image"), why, val.root)
            self.empty = sorted({*self.empty, *unread})
        # an empty val folder of no training class is no class either (as in relabel); not refused, as ImageFolder
        # refuses any empty class folder: a folder made ahead of its images is common, and said by name
        if gone := sorted({*self.empty, *(name for name in val.empty if name not in self.classes)}):
            if empty := [name for name in gone if name not in unread]:
                log.warning("%s: %d class folder(s) without a training image, e.g. %s: no class, in %s too; add its "
                            "training images or remove the folder", self.root, len(empty),
                            (self.root if empty[0] in self.empty else val.root) / empty[0], val.root)
            val.drop_classes([name for name in gone if name in val.classes])
            self.drop_classes([name for name in gone if name in self.classes])
            self.check_classes()  # what is left may be one class
        if self.classes != val.classes:
            train_only, val_only = classes_only_in(self.classes, val.classes)
            raise ValueError(f"train and val class folders differ: only in {self.root}: {train_only}, only "
                             f"in {val.root}: {val_only}; give both splits the same class folders"
                             f"{unicode_forms_note(self.classes, val.classes)}")
        if val.empty:
            log.warning("%s: %d class folder(s) without an image, e.g. %s: no held-out sample of that class; add its "
                        "images", val.root, len(val.empty), val.root / val.empty[0])

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """ImageFolder's ``[(path, class index), ...]``, a new list each time."""
        return list(zip(self.paths, self.targets))

    @property
    def targets(self) -> list[int]:
        """ImageFolder's class index of every sample, a new list each time."""
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple:
        path, label = self.paths.text(index), int(self.labels[index])
        try:
            pixels = self.load(path)
            image = tensor_to_pil(pixels)  # what timm's transforms take
        except (ValueError, RuntimeError, OSError) as exc:
            if index not in self.warned:  # once per file and process: a finetuning reads it again every epoch
                self.warned.add(index)
                log.warning("skipped an unreadable image: %s", exc)
            return LabelledItem(None, label, path)
        # Not under the except: a decoded image is no fault of the file, so a transform's error is a bug to see.
        # Counted as an unreadable image, an augmentation that fails 1 draw in 40 blamed that many files, and
        # stopped runs with "fix or remove them" once a tenth of the set had drawn it.
        return LabelledItem(self.transform(image) if self.transform else image, label, path, tuple(pixels.shape[-2:]))
