"""Data: discovery, robust decoding of odd files, reproducible augmentation, collation."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lomar.data.collate import BadDataTracker, collate_pretrain
from lomar.data.decode import load_image
from lomar.data.demo_images import demo_image_paths
from lomar.data.folder import build_image_list, build_pretrain_dataset
from lomar.data.transforms import PretrainTransform, denormalize


def _save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _rgb(size=(40, 30), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def odd_folder(tmp_path):
    root = tmp_path / "imgs"
    _save(_rgb(), root / "a" / "rgb.jpg")
    _save(_rgb().convert("L"), root / "gray.png")
    _save(_rgb().convert("RGBA"), root / "b" / "rgba.png")
    _save(_rgb().convert("CMYK"), root / "cmyk.jpg")
    _save(Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)), root / "deep16.png")
    _save(_rgb().convert("P"), root / "palette.png")
    _save(_rgb((5, 4)), root / "tiny.png")
    _save(_rgb().convert("P"), root / "anim.GIF", save_all=True, append_images=[_rgb(seed=1).convert("P")])
    (root / "zero.jpg").write_bytes(b"")
    (root / "garbage.png").write_bytes(b"this is not an image at all")
    full = io.BytesIO()
    _rgb((200, 200)).save(full, format="PNG")
    (root / "truncated.png").write_bytes(full.getvalue()[:300])
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


GOOD = {"rgb.jpg", "gray.png", "rgba.png", "cmyk.jpg", "deep16.png", "palette.png", "tiny.png", "anim.GIF"}
BAD = {"zero.jpg", "garbage.png", "truncated.png"}


def test_folder_discovery_is_recursive_and_sorted(odd_folder):
    paths = list(build_image_list(odd_folder))
    assert {p.name for p in paths} == GOOD | BAD
    assert paths == sorted(paths)


def test_odd_images_convert_and_bad_ones_raise(odd_folder):
    for name in GOOD:
        image = load_image(next(odd_folder.rglob(name)))
        assert image.dtype == torch.uint8 and image.shape[0] == 3, name
    assert load_image(odd_folder / "deep16.png").max() > 100  # scaled, not clipped to 0/255 garbage
    gray = load_image(odd_folder / "gray.png")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgb = torch.from_numpy(np.array(_rgb())).permute(2, 0, 1)
    assert torch.equal(load_image(odd_folder / "b" / "rgba.png"), rgb)  # alpha dropped, colours kept
    # CMYK JPEG: colours survive the round trip up to JPEG loss (not inverted, not garbage).
    assert (load_image(odd_folder / "cmyk.jpg").float() - rgb.float()).abs().mean() < 20
    for name in BAD:
        with pytest.raises(ValueError, match=name):
            load_image(odd_folder / name)


def test_truncated_jpeg_decodes_partially_or_is_skipped(tmp_path):
    full = io.BytesIO()
    _rgb((64, 64)).save(full, format="JPEG")
    _save(_rgb(), tmp_path / "ok.jpg")
    (tmp_path / "cut.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    try:
        assert load_image(tmp_path / "cut.jpg").shape == (3, 64, 64)  # libjpeg pads the missing rows
    except ValueError as exc:
        assert "cut.jpg" in str(exc)
    ds = build_pretrain_dataset(str(tmp_path), 16)
    assert all(ds[(i, 0)]["image"] is None or ds[(i, 0)]["image"].shape == (3, 16, 16) for i in range(2))


def test_dataset_skips_bad_files_and_collates(odd_folder):
    ds = build_pretrain_dataset(str(odd_folder), 32, seed=0)
    items = [ds[(i, 0)] for i in range(len(ds))]
    bad = {item["path"].split("/")[-1] for item in items if item["image"] is None}
    assert bad == BAD
    batch = collate_pretrain(items)
    assert batch["images"].shape == (len(GOOD), 3, 32, 32) and batch["images"].dtype == torch.float32
    assert {p.split("/")[-1] for p in batch["bad"]} == BAD
    empty = collate_pretrain([items[i] for i, it in enumerate(items) if it["image"] is None])
    assert empty["images"].shape == (0, 3, 32, 32) and len(empty["bad"]) == len(BAD)
    assert torch.equal(ds[(np.int64(1), torch.tensor(0))]["image"], items[1]["image"])  # numpy/tensor keys


def test_text_list_and_errors(tmp_path, odd_folder):
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nimgs/a/rgb.jpg\n\n" + str(odd_folder / "gray.png") + "\n")
    assert [p.name for p in build_image_list(listing)] == ["rgb.jpg", "gray.png"]
    with pytest.raises(ValueError, match="does not exist"):
        build_pretrain_dataset(str(tmp_path / "missing"), 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_pretrain_dataset(str(tmp_path / "empty"), 32)
    with pytest.raises(ValueError, match="no tar shards"):
        build_pretrain_dataset(str(tmp_path / "shard-{000..002}.tar"), 32)
    listing.write_bytes(b"\xff\xfe\x00x\n")
    with pytest.raises(ValueError, match=r"list.txt is not a UTF-8 text list of image paths; pass a .txt"):
        build_image_list(listing)


def test_a_text_list_saved_with_a_byte_order_mark_and_crlf_keeps_its_first_path(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffa.jpg\r\nb.jpg\r\n".encode())  # as Windows editors save it
    assert list(build_image_list(listing)) == [tmp_path / "a.jpg", tmp_path / "b.jpg"]


def test_augmentation_is_pure_function_of_seed_epoch_index(odd_folder):
    ds = build_pretrain_dataset(str(odd_folder), 32, seed=3)
    a, b = ds[(0, 1)]["image"], ds[(0, 1)]["image"]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(0, 2)]["image"])
    other_seed = build_pretrain_dataset(str(odd_folder), 32, seed=4)
    assert not torch.equal(a, other_seed[(0, 1)]["image"])


def test_crop_box_stays_inside_and_matches_scale():
    transform = PretrainTransform(64)
    gen = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(300):
        top, left, h, w = transform.crop_box(100, 150, gen)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 150
        areas.append(h * w / 15000)
    assert 0.15 < min(areas) and max(areas) <= 1.0 and 0.45 < np.mean(areas) < 0.75


def test_masker_output_is_collated(odd_folder):
    masker = lambda gen: {"noise": torch.rand(4, generator=gen)}  # noqa: E731
    ds = build_pretrain_dataset(str(odd_folder), 32, masker=masker)
    batch = collate_pretrain([ds[(i, 0)] for i in range(3)])
    assert batch["noise"].shape == (batch["images"].shape[0], 4)


def _write_shard(path, count, fmt="JPEG", seed=0, extra=b""):
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            buf = io.BytesIO()
            _rgb(seed=seed + i).save(buf, format=fmt)
            info = tarfile.TarInfo(f"{i:05d}.{fmt.lower()}")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            label = tarfile.TarInfo(f"{i:05d}.cls")  # WebDataset companion member: ignored
            label.size = 1
            tar.addfile(label, io.BytesIO(b"7"))
        if extra:
            bad = tarfile.TarInfo("99999.png")
            bad.size = len(extra)
            tar.addfile(bad, io.BytesIO(extra))


def test_tar_shards(tmp_path):
    for s in range(2):
        _write_shard(tmp_path / f"shard-{s:03d}.tar", 3, seed=s * 10, extra=b"bad")
    ds = build_pretrain_dataset(str(tmp_path / "shard-{000..001}.tar"), 32)
    items = list(ds)
    assert sum(it["image"] is not None for it in items) == 6 and sum(it["image"] is None for it in items) == 2
    assert ds.count_samples() == 8
    ds.set_epoch(1)  # shard order and buffer order change with the epoch, the samples do not
    assert sorted(it["path"] for it in ds) == sorted(it["path"] for it in items)
    halves = [{it["path"].split(":")[0] for it in build_pretrain_dataset(str(tmp_path / "shard-*.tar"), 32,
                                                                          rank=r, world_size=2)} for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 1 and halves[0] != halves[1]  # one whole shard per rank
    # Fewer shards (2) than readers (3 ranks): samples are dealt out, every rank gets some.
    shares = [[it["path"] for it in build_pretrain_dataset(str(tmp_path / "shard-*.tar"), 32, rank=r,
                                                           world_size=3)] for r in range(3)]
    assert all(shares) and sorted(sum(shares, [])) == sorted(it["path"] for it in items)
    # A truncated shard yields what precedes the damage instead of crashing the loader.
    with tarfile.open(tmp_path / "shard-000.tar") as tar:
        end = tar.getmember("00001.jpeg").offset_data + 100  # inside the second image
    (tmp_path / "cut.tar").write_bytes((tmp_path / "shard-000.tar").read_bytes()[:end])
    cut = [it["path"] for it in build_pretrain_dataset(str(tmp_path / "cut.tar"), 32)]
    assert cut == [f"{tmp_path / 'cut.tar'}:00000.jpeg"]


def test_shards_moved_elsewhere_draw_the_same_samples(tmp_path):
    """A sample was seeded by its shard's absolute path: the same shards copied to another folder (a node's local
    disk) trained otherwise, and a run resumed from there went on with other crops and masks, unwarned, since the
    listing's digest, relative to the shards' folder, found the same data."""
    for folder in ("a", "b/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        for s in range(2):
            _write_shard(tmp_path / folder / f"shard-{s}.tar", 2, seed=s * 10)
    here, there = (list(build_pretrain_dataset(str(tmp_path / folder / "shard-*.tar"), 16, rank=0, world_size=1))
                   for folder in ("a", "b/deeper"))
    assert [it["path"] for it in here] == [it["path"].replace("b/deeper", "a") for it in there]
    for one, other in zip(here, there, strict=True):
        assert torch.equal(one["image"], other["image"])
    old = build_pretrain_dataset(str(tmp_path / "b/deeper/shard-*.tar"), 16, rank=0, world_size=1)
    old.seed_root = ""  # a run saved before: seeded by the whole path, as it goes on when resumed
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(here, old, strict=True))


def test_a_resume_in_a_second_pass_over_the_shards_continues_the_stream(tmp_path):
    # 5 samples, 4 batches of 2: the reader goes over its shard twice; the second pass's shuffle drew from
    # the last decoded sample's generator, which a resume (skipping the first pass undecoded) never made
    _write_shard(tmp_path / "one.tar", 5, fmt="PNG")
    ds = build_pretrain_dataset(str(tmp_path / "one.tar"), 16, rank=0, world_size=1)
    ds.count_samples()
    ds.set_epoch(0, batch_size=2, batches=4)
    stream = [it["path"] for it in ds]
    ds.set_epoch(0, skip=6, batch_size=2, batches=4)
    assert [it["path"] for it in ds] == stream[6:]


def test_tar_epoch_and_resume_reach_persistent_workers(tmp_path):
    _write_shard(tmp_path / "one.tar", 6, fmt="PNG")
    ds = build_pretrain_dataset(str(tmp_path / "one.tar"), 16)
    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True, collate_fn=collate_pretrain)
    epochs, runs = [], []
    for epoch in range(2):
        ds.set_epoch(epoch)
        runs.append(list(loader))
        epochs.append({p: img for b in runs[-1] for p, img in zip(b["paths"], b["images"])})
    assert len(epochs[0]) == len(epochs[1]) == 6  # 1 shard, 2 workers: each sample once
    assert all(not torch.equal(epochs[0][p], epochs[1][p]) for p in epochs[0])
    # Resume after one batch of epoch 1: the rest of the stream, identical, in the same order.
    ds.set_epoch(1, skip=2, batch_size=2)
    resumed = list(loader)
    assert [b["paths"] for b in resumed] == [b["paths"] for b in runs[1][1:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, runs[1][1:]))


def test_loader_with_workers(odd_folder):
    ds = build_pretrain_dataset(str(odd_folder), 32)
    keys = [(i, 0) for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=4, sampler=keys, num_workers=2, persistent_workers=True,
                        collate_fn=collate_pretrain)
    batches = list(loader)
    assert sum(b["images"].shape[0] for b in batches if b["images"].numel()) == len(GOOD)
    inline = collate_pretrain([ds[k] for k in keys[:4]])
    assert torch.equal(batches[0]["images"], inline["images"])


def test_bad_data_tracker_counts_distinct_files_against_the_dataset():
    tracker = BadDataTracker(total=20)
    tracker.update(["a.jpg", "b.jpg"], 4)  # 2 bad in the first 4: a running share would be 50%
    tracker.check()
    tracker.update(["a.jpg"], 16)  # seen again in a later epoch: still 2 distinct files
    tracker.check()
    tracker.update(["c.jpg"], 4)
    with pytest.raises(ValueError, match=r"3 of 20 images \(over 10%\) could not be used, e.g. a.jpg"):
        tracker.check(0.1)


def test_bad_data_tracker():
    tracker = BadDataTracker(min_seen=10)
    tracker.update(["x.jpg"], 5)
    tracker.check()  # too few seen to judge
    tracker.update(["x.jpg", "y.jpg"], 10)
    assert tracker.count == 2 and tracker.failures == 3
    with pytest.raises(ValueError, match=r"3 of 15 images \(20%\) could not be used, e.g. x.jpg"):
        tracker.check(0.1)


def test_demo_images_and_denormalize():
    paths = demo_image_paths()
    assert len(paths) >= 8
    sizes = []
    for path in paths:
        with Image.open(path) as img:  # reads the header only
            sizes.append(img.size)
    assert max(max(s) for s in sizes) > 1000
    smallest = min(paths, key=lambda p: p.stat().st_size)
    assert load_image(smallest).shape[0] == 3
    x = torch.zeros(1, 3, 2, 2)
    assert torch.allclose(denormalize(x)[0, :, 0, 0], torch.tensor([0.485, 0.456, 0.406]))


@pytest.mark.parametrize("sizes, workers", [((3, 3), 2), ((7, 1), 2), ((5, 0), 2), ((4,), 3)])
def test_every_loader_worker_delivers_exactly_its_share_of_the_epoch(tmp_path, sizes, workers):
    """Per-worker drop_last and uneven (or empty) shards would leave the loader short of the epoch's
    batches, and the run asking for the rest forever: each worker delivers its share, reading its shards
    again when they hold less."""
    for s, count in enumerate(sizes):
        _write_shard(tmp_path / f"shard-{s:03d}.tar", count, fmt="PNG", seed=10 * s)
    ds = build_pretrain_dataset(str(tmp_path / "shard-*.tar"), 16)
    batch = 2
    batches = ds.count_samples() // batch
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True, collate_fn=collate_pretrain)
    for epoch in (0, 1):
        ds.set_epoch(epoch, batch_size=batch, batches=batches)
        got = [b["paths"] for b in loader]
        assert len(got) == batches and all(len(paths) == batch for paths in got)
    ds.set_epoch(1, skip=batch, batch_size=batch, batches=batches)  # a resume after one batch: the rest
    assert [b["paths"] for b in loader] == got[1:]
