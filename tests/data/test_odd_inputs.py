"""Inputs real data sets hold that the usual fixtures do not: odd tar members and shard names, float and
lossy files, damaged EXIF and scan bombs, macOS metadata, lists and folders of the wrong shape."""

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from crafted import png_chunk
from lomar.data.decode import decode_bytes
from lomar.data.fast_decode import FastPretrainDataset
from lomar.data.folder import ImageListDataset, LabelledImageFolder
from lomar.data.shards import TarShardDataset
from lomar.data.transforms import PretrainTransform


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    archive.addfile(info, io.BytesIO(data) if data else None)


def _items(shard) -> dict:
    dataset = TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=1)
    dataset.count_samples()
    return {item["path"].split(":")[-1]: item for item in dataset}


def test_a_shard_member_named_in_another_encoding_is_a_sample_not_a_crash(tmp_path):
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as archive:
        _add(archive, "caf\xe9.jpg", _jpeg())  # the byte 0xE9: not UTF-8, read back with a surrogate
    items = list(TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=1))
    assert len(items) == 1 and items[0]["image"].shape == (3, 16, 16)


def test_linked_shard_members_are_samples_or_skipped_and_counted(tmp_path):
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as archive:  # GNU tar stores a file's second name as a hard link
        _add(archive, "a.jpg", _jpeg())
        _add(archive, "hard.jpg", kind=tarfile.LNKTYPE, link="a.jpg")
        _add(archive, "sym.jpg", kind=tarfile.SYMTYPE, link="a.jpg")
        _add(archive, "out.jpg", kind=tarfile.SYMTYPE, link="/etc/hostname")  # never read outside the shard
        _add(archive, "loop.jpg", kind=tarfile.SYMTYPE, link="loop.jpg")
    dataset = TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=1)
    assert dataset.count_samples() == 5
    items = _items(shard)
    assert sorted(items) == ["a.jpg", "hard.jpg", "loop.jpg", "out.jpg", "sym.jpg"]
    assert all(items[name]["image"] is not None for name in ("a.jpg", "hard.jpg", "sym.jpg"))
    assert items["out.jpg"]["image"] is None and "a link to /etc/hostname, which the shard does not hold" in (
        items["out.jpg"]["why"])
    assert items["loop.jpg"]["image"] is None and "\n" not in items["loop.jpg"]["why"]


def test_a_floating_point_tiff_is_refused_not_clipped_to_black(tmp_path):
    out = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).rand(40, 60).astype(np.float32)).save(out, format="TIFF")  # 0..1
    with pytest.raises(ValueError, match=r"t.tif: a 32-bit floating-point image has no known value range; convert"):
        decode_bytes(out.getvalue(), "t.tif")
    (tmp_path / "t.tif").write_bytes(out.getvalue())
    masker = lambda gen: {"top_left": torch.zeros(1, 2, dtype=torch.long), "mask": torch.zeros(4)}  # noqa: E731
    base = ImageListDataset([tmp_path / "t.tif"], PretrainTransform(16), masker=masker)
    for dataset in (base, FastPretrainDataset(base, "windows", patch_size=2, window_size=2, num_windows=1)):
        assert dataset[0]["image"] is None and "floating-point" in dataset[0]["why"]


def test_an_annotation_with_a_broken_chunk_is_one_line_naming_it(tmp_path):
    from lomar.data.segmentation import read_labels

    pixels = zlib.compress(b"".join(b"\0" + bytes(range(8)) for _ in range(8)))
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    # the pixel data goes on in a chunk with a garbled type: Pillow raises SyntaxError while decoding, not OSError
    body = png_chunk(b"IDAT", pixels[:10]) + png_chunk(b"\x99\xae\xe9\x81", pixels[10:]) + png_chunk(b"IEND", b"")
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + body)
    with pytest.raises(ValueError, match=r"annotation .*a.png cannot be read \(broken PNG file .*\); rewrite it as a"):
        read_labels(tmp_path / "a.png")


@pytest.mark.parametrize("images, fraction", [(2, 0.75), (4, 0.0001)])
def test_compose_digits_gives_each_split_a_picture_at_any_val_fraction(tmp_path, images, fraction):
    from lomar.data.compose import compose_digits

    summary = compose_digits(tmp_path / "s", img_size=32, images=images, val_fraction=fraction, per_image=(1, 1))
    assert all(summary["splits"][split]["images"] >= 1 for split in ("train", "val"))
    assert all(any((tmp_path / "s" / "images" / split).iterdir()) for split in ("train", "val"))


def test_compose_digits_bounds_the_classify_pictures_before_allocating_them(tmp_path, capsys):
    from lomar.cli.app import main
    from lomar.data.compose import compose_digits

    code = main(["compose-digits", "--out", str(tmp_path / "s"), "--img-size", "32", "--images", "2",
                 "--classify-images", "2", "--classify-size", "90000"])  # a 97 GB canvas, unless refused
    err = capsys.readouterr().err
    assert code == 2 and "--classify-size" in err and "8192" in err and err.count("\n") == 1
    for size in ({"classify_size": 90000, "classify_images": 2}, {"img_size": 90000}):
        with pytest.raises(ValueError, match="8192"):
            compose_digits(tmp_path / "t", **{"img_size": 32, "images": 2, **size})


def test_images_beside_the_class_folders_and_empty_classes_are_not_passed_over_unsaid(tmp_path, caplog):
    import logging

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "cat" / "a.jpg", tmp_path / "dog" / "b.jpg", tmp_path / "stray.jpg"):
        path.write_bytes(_jpeg())
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        folder = LabelledImageFolder(tmp_path)
    assert len(folder) == 2 and folder.classes == ["cat", "dog", "empty"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("1 image(s) outside the class folders, e.g. stray.jpg, are not used" in line for line in lines)
    assert any("1 class folder(s) without an image, e.g. empty" in line for line in lines)


def test_a_text_list_none_of_whose_first_paths_exists_is_refused_up_front(tmp_path):
    from lomar.data.folder import build_pretrain_dataset

    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(_jpeg())
    labelled = tmp_path / "train.txt"  # ImageNet's form: a label after each path
    labelled.write_text("".join(f"images/{i}.jpg {i}\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"train.txt: none of its first 3 paths exists, e.g. .*images/0.jpg 0; its "
                                         r"lines look like 'path label': list one path a line, without labels"):
        build_pretrain_dataset(str(labelled), 16)
    elsewhere = tmp_path / "images" / "list.txt"  # relative to the working folder, not to the list's
    elsewhere.write_text("images/0.jpg\nimages/1.jpg\n")
    with pytest.raises(ValueError, match=r"relative paths are read from the list's folder .*images$"):
        build_pretrain_dataset(str(elsewhere), 16)
    # lines as a shell or a spreadsheet writes them: the hint is what is wrong with them, not the list's folder
    for name, line, words in [("quoted", f'"{tmp_path}/images/0.jpg"', "its paths are in quotes: write them without"),
                              ("tilde", "~/images/0.jpg", "'~' is not expanded in a list: write the home folder out"),
                              ("urls", f"file://{tmp_path}/images/0.jpg", "its lines are URLs: list the files' local")]:
        (tmp_path / f"{name}.txt").write_text(f"# mine\n{line}\n")
        with pytest.raises(ValueError, match=f"{name}.txt: none of its first 1 paths exists, .*; {words}"):
            build_pretrain_dataset(str(tmp_path / f"{name}.txt"), 16)
    fine = tmp_path / "fine.txt"  # some missing: skipped and counted when read, as before
    fine.write_text("images/missing.jpg\nimages/1.jpg\n")
    dataset = build_pretrain_dataset(str(fine), 16)
    assert dataset[0]["image"] is None and dataset[1]["image"] is not None


def test_a_file_of_another_format_named_as_an_image_reaches_no_other_pillow_plugin(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    rendered = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: rendered.append(a))  # EPS is run by gs
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    ppm, ico = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(ppm, format="PPM")
    Image.new("RGB", (16, 16), "red").save(ico, format="ICO")
    for data in (eps, ppm.getvalue(), ico.getvalue()):
        with pytest.raises(ValueError, match=r"photo.jpg: not an image format lomar reads \(JPEG, PNG, GIF, BMP, TIFF"):
            decode_bytes(data, "photo.jpg")
    assert not rendered
    mpo = io.BytesIO()  # a camera's JPEG of two pictures: Pillow's JPEG opener names it MPO
    Image.new("RGB", (30, 20), "red").save(mpo, format="MPO", save_all=True,
                                           append_images=[Image.new("RGB", (30, 20), "blue")])
    assert decode_bytes(mpo.getvalue(), "camera.jpg").shape == (3, 20, 30)


def test_a_heic_or_avif_photo_named_as_a_jpeg_is_named_by_its_format(tmp_path):
    """A phone's HEIC named .jpg was 'not an image format lomar reads (... starting b'\\x00\\x00\\x00\\x18ftyp')'."""
    box = b"\x00\x00\x00\x18ftyp{}\x00\x00\x00\x00mif1heic" + bytes(64)
    for brand, name in ((b"heic", "HEIC"), (b"mif1", "HEIF"), (b"avif", "AVIF")):
        with pytest.raises(ValueError, match=rf"^cannot decode image IMG_1.jpg: it is a photo in {name}, a format "
                                             rf"lomar does not read \(JPEG, PNG, GIF, BMP, TIFF, WebP\); convert it to "
                                             rf"JPEG or PNG$"):
            decode_bytes(box.replace(b"{}", brand), "IMG_1.jpg")
    with pytest.raises(ValueError, match=r"in JPEG XL, a format"):
        decode_bytes(b"\xff\x0a" + bytes(64), "IMG_2.jpg")
    with pytest.raises(ValueError, match=r"not an image format lomar reads"):  # an MP4 is not a photo
        decode_bytes(box.replace(b"{}", b"isom"), "clip.jpg")


def test_a_jpeg_of_a_thousand_repeated_scans_is_refused_before_libjpeg_works_through_them():
    out = io.BytesIO()
    Image.new("L", (64, 64), 128).save(out, format="JPEG", progressive=True)
    data = out.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    end = data.rfind(b"\xff\xd9")
    scan = data[starts[-1]:end]  # each copy is decoded over the whole frame again: minutes on a large one
    assert decode_bytes(data, "ok.jpg").shape == (3, 64, 64)
    with pytest.raises(ValueError, match=r"bomb.jpg: a JPEG of 1,00\d scans, over the 100 any encoder writes"):
        decode_bytes(data[:end] + scan * 1000 + data[end:], "bomb.jpg")


def test_macos_metadata_files_beside_the_photos_are_no_images(tmp_path, caplog):
    import logging

    from lomar.data.image_search import find_images

    (tmp_path / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble header
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert find_images(tmp_path) == [tmp_path / "a.jpg"]
    assert any("1 macOS metadata file(s) named ._IMAGE skipped" in r.getMessage() for r in caplog.records)
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as archive:  # macOS tar adds ._NAME members alike
        _add(archive, "x/a.jpg", _jpeg())
        _add(archive, "x/._a.jpg", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert TarShardDataset([shard], PretrainTransform(16)).count_samples() == 1 and list(_items(shard)) == ["x/a.jpg"]


def test_a_folder_that_cannot_be_listed_is_reported_not_passed_over(tmp_path, monkeypatch, caplog):
    import logging
    import os

    from lomar.data.image_search import find_images

    (tmp_path / "open").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "open" / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "locked" / "b.jpg").write_bytes(_jpeg())
    real = os.scandir

    def scandir(path="."):  # what chmod 000 on another user's folder gives (the tests may run as root)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert find_images(tmp_path) == [tmp_path / "open" / "a.jpg"]
    assert any("1 folder(s) could not be listed, e.g. " in r.getMessage() and "locked (Permission denied)" in
               r.getMessage() for r in caplog.records)


def test_a_coco_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    import json

    from lomar.data.coco import read_coco

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(_jpeg())
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 30, "height": 20}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],
                             "segmentation": [[0, 0, 10, 0, 10, 10]]}]}
    (tmp_path / "ann.json").write_bytes("\ufeff".encode() + json.dumps(coco).encode())  # as PowerShell writes it
    assert read_coco(tmp_path / "ann.json", tmp_path / "images").summary.boxes == 1


@pytest.mark.parametrize("second", ["c/y.JPG", "./c/y.JPG", "c//y.JPG", "link.JPG"])
def test_two_coco_images_naming_one_file_are_said_in_the_summary_line(tmp_path, second):
    """Each id is trained and scored as a photo of its own annotations only: right for a photo labelled twice
    (LIVECell's files hold such), not for one whose objects were split between ids; it was said nowhere."""
    import json

    from lomar.data.coco import read_coco

    (tmp_path / "images" / "c").mkdir(parents=True)
    for name in ("c/y.JPG", "c/z.JPG"):
        (tmp_path / "images" / name).write_bytes(_jpeg())
    (tmp_path / "images" / "link.JPG").symlink_to("c/y.JPG")
    names = ["c/z.JPG", "c/y.JPG", second]
    coco = {"images": [{"id": 7 + i, "file_name": name, "width": 30, "height": 20} for i, name in enumerate(names)],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": i, "image_id": 7 + i, "category_id": 1, "bbox": [0, 0, 10, 10],
                             "segmentation": [[0, 0, 10, 0, 10, 10]]} for i in range(3)]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    split = read_coco(tmp_path / "ann.json", tmp_path / "images")
    assert [a["image_id"] for a in split.data["annotations"]] == [7, 8, 9]  # each id keeps its own
    assert (split.summary.shared, split.summary.shared_first) == (
        1, f"images[1] (id 8, 'c/y.JPG') and images[2] (id 9, {second!r})")
    assert split.summary.line().endswith(
        f"1 images naming a file an earlier image names, e.g. images[1] (id 8, 'c/y.JPG') and images[2] (id 9, "
        f"{second!r}) (each trained and scored as a photo of only its own annotations)")
    coco["images"][2]["file_name"] = "c/z.JPG"  # the count: c/z.JPG twice too
    coco["images"].append({"id": 20, "file_name": "./c/y.JPG", "width": 30, "height": 20})
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    summary = read_coco(tmp_path / "ann.json", tmp_path / "images").summary
    assert (summary.shared, summary.shared_first) == (2, "images[0] (id 7, 'c/z.JPG') and images[2] (id 9, 'c/z.JPG')")
    coco["images"] = coco["images"][:2] + [{"id": 9, "file_name": "c/x.JPG", "width": 30, "height": 20}]  # 3 files
    (tmp_path / "images" / "c" / "x.JPG").write_bytes(_jpeg())
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    summary = read_coco(tmp_path / "ann.json", tmp_path / "images").summary
    assert (summary.shared, summary.shared_first) == (0, "") and "naming a file" not in summary.line()


def test_a_coco_image_whose_stat_fails_otherwise_than_absent_is_not_called_missing(tmp_path):
    """A name too long (or a folder denied) is said as what it is by the command's OSError line, as when the check
    was Path.is_file: it is no missing image to look for under the folder."""
    import errno
    import json

    from lomar.data.coco import read_coco

    (tmp_path / "images").mkdir()
    coco = {"images": [{"id": 1, "file_name": "x" * 300 + ".jpg", "width": 30, "height": 20}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    with pytest.raises(OSError) as caught:
        read_coco(tmp_path / "ann.json", tmp_path / "images")
    assert caught.value.errno == errno.ENAMETOOLONG


def test_macos_metadata_files_in_a_segmentation_folder_are_no_pairs(tmp_path):
    from lomar.data.segmentation import SegmentationFolder

    for kind in ("images", "annotations"):
        (tmp_path / kind / "training").mkdir(parents=True)
    (tmp_path / "images" / "training" / "a.jpg").write_bytes(_jpeg())
    Image.fromarray(np.ones((20, 30), np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    for kind, name in (("images", "._a.jpg"), ("annotations", "._a.png")):
        (tmp_path / kind / "training" / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert len(SegmentationFolder(tmp_path, "training", num_classes=1, crop=16, workers=1)) == 1


def _exif_jpeg(orientation: int, count: bytes = b"\x00\x00\x00\x01") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(1).rand(20, 40, 3) * 255).astype(np.uint8)).save(
        out, format="JPEG", quality=95, exif=exif)
    entry = b"\x01\x12\x00\x03\x00\x00\x00\x01"  # orientation, SHORT, count 1 (Pillow writes big-endian "MM")
    assert entry in out.getvalue()
    return out.getvalue().replace(entry, entry[:4] + count)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_pixels_are_turned_as_pillow_turns_them(orientation):
    from PIL import ImageOps

    stored = decode_bytes(_exif_jpeg(1))
    upright = Image.fromarray(stored.permute(1, 2, 0).numpy())
    upright.getexif()[0x0112] = orientation
    upright.info["exif"] = upright.getexif().tobytes()
    want = torch.from_numpy(np.array(ImageOps.exif_transpose(upright))).permute(2, 0, 1)
    assert torch.equal(decode_bytes(_exif_jpeg(orientation)), want)


def test_a_damaged_exif_block_turns_the_pixels_as_the_header_size_says():
    from lomar.data.decode import open_pil, oriented_size

    data = _exif_jpeg(6, count=b"\xf4\x00\x00\x01")  # an absurd count: Pillow skips the tag, libjpeg's reader did not
    with open_pil(data) as img:
        size = oriented_size(img)
    assert tuple(decode_bytes(data).shape[1:]) == size == (20, 40)  # not (40, 20): labels checked on 20x40 would misfit


def test_an_annotation_that_is_a_jpeg_named_png_is_refused(tmp_path):
    from lomar.data.segmentation import read_labels

    y, x = np.mgrid[0:100, 0:100]
    labels = np.where((x - 47) ** 2 + (y - 53) ** 2 < 30 ** 2, 12, 3).astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "a.png", format="JPEG")  # 12 and 3 ring into 0..15 along the circle
    with Image.open(tmp_path / "a.png") as image:
        assert (np.asarray(image) != labels).any()
    with pytest.raises(ValueError, match=r"annotation .*a.png is a JPEG file, whose lossy compression can change "
                                         r"class ids along edges; write class ids as a PNG"):
        read_labels(tmp_path / "a.png")


def test_shards_in_a_folder_whose_name_holds_brackets_are_found(tmp_path):
    from lomar.data.shards import shard_paths

    folder = tmp_path / "set [v2]"  # glob would read [v2] as one character of v or 2
    folder.mkdir()
    for name in ("s-000.tar", "s-001.tar"):
        with tarfile.open(folder / name, "w") as archive:
            _add(archive, "a.jpg", _jpeg())
    both = [folder / "s-000.tar", folder / "s-001.tar"]
    assert shard_paths(str(folder / "s-000.tar")) == both[:1]
    assert shard_paths(str(folder / "s-{000..001}.tar")) == shard_paths(str(folder / "*.tar")) == both
    with pytest.raises(ValueError, match=r"names 1 shard\(s\) that do not exist, e.g. .*s-002.tar"):
        shard_paths(str(folder / "s-{000..002}.tar"))


def test_a_data_root_holding_train_and_val_says_both_are_read(tmp_path, caplog):
    import logging

    from lomar.data.folder import build_image_list

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.jpg").write_bytes(_jpeg())
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert len(build_image_list(tmp_path)) == 2
        assert len(build_image_list(tmp_path / "train")) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"holds train/ and val/: every image under it is read, val/ included; pass " \
        f"{tmp_path / 'train'}" in lines[0]


def test_a_named_pipe_among_the_shards_is_refused_not_waited_on(tmp_path):
    import os

    from lomar.data.shards import shard_paths

    with tarfile.open(tmp_path / "a.tar", "w") as archive:
        _add(archive, "a.jpg", _jpeg())
    os.mkfifo(tmp_path / "b.tar")  # tarfile.open on it blocked the start-up count for ever
    with pytest.raises(ValueError, match=r"matches .*b.tar, which is not a regular file \(a folder, a named pipe or a "
                                         r"device\); narrow the pattern or remove it"):
        shard_paths(str(tmp_path / "*.tar"))


def test_a_palette_png_with_transparency_decodes_without_pillows_warning():
    import warnings

    from PIL import ImageOps

    image = Image.fromarray((np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)).convert("P")
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=bytes([0, 255, 128] + [255] * 253))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. 'Palette images with Transparency expressed in bytes should be ...'
        pixels = decode_bytes(out.getvalue())
    via_rgba = ImageOps.exif_transpose(Image.open(io.BytesIO(out.getvalue())).convert("RGBA")).convert("RGB")
    assert torch.equal(pixels, torch.from_numpy(np.array(via_rgba)).permute(2, 0, 1))


def test_a_damaged_exif_block_is_read_without_pillows_warnings():
    import warnings

    from lomar.data.decode import exif_orientation, open_pil

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_pil(_exif_jpeg(6, count=b"\xf4\x00\x00\x01")) as img:
            assert exif_orientation(img) == 1  # the tag Pillow skips
    assert not caught  # no 'Tag data larger than file. Skipping tag 274' from every loader worker


@pytest.mark.parametrize("low, high", [(-1024, 3000), (0, 70000)])
def test_a_32_bit_integer_image_outside_16_bits_is_refused_not_clipped(low, high):
    out = io.BytesIO()  # a CT slice in Hounsfield units (signed), or counts wider than 16 bits
    Image.fromarray(np.linspace(low, high, 40 * 60).reshape(40, 60).astype(np.int32)).save(out, format="TIFF")
    with pytest.raises(ValueError, match=rf"ct.tif: a 32-bit integer image with values from {low} to {high} has no "
                                         r"known range; convert it to 8 or 16 bits"):
        decode_bytes(out.getvalue(), "ct.tif")
    inside = io.BytesIO()  # 0..65535 in a 32-bit container: scaled by 16 bits, as before
    Image.fromarray(np.full((4, 4), 65535, np.int32)).save(inside, format="TIFF")
    assert int(decode_bytes(inside.getvalue())[0, 0, 0]) == 255


def test_window_decoding_of_a_palette_png_with_transparency_prints_no_pillow_warning(tmp_path):
    import warnings

    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)).convert("P")
    image.save(tmp_path / "p.png", transparency=bytes([0, 255, 128] + [255] * 253))
    masker = lambda gen: {"top_left": torch.zeros(1, 2, dtype=torch.long), "mask": torch.zeros(4)}  # noqa: E731
    base = ImageListDataset([tmp_path / "p.png"], PretrainTransform(32), masker=masker)
    windows = FastPretrainDataset(base, "windows", patch_size=2, window_size=2, num_windows=1)
    assert windows.sparse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert windows[0]["image"].shape == (3, 32, 32)


def test_jpegs_under_their_other_names_are_images(tmp_path):
    """A photo Chrome saved as .jfif (or a .jpe) was not found, without a word."""
    from lomar.data.decode import load_image
    from lomar.data.image_search import find_images

    for name in ("a.JFIF", "b.jpe", "c.jpg"):
        (tmp_path / name).write_bytes(_jpeg())
    assert find_images(tmp_path) == [tmp_path / n for n in ("a.JFIF", "b.jpe", "c.jpg")]
    assert load_image(tmp_path / "a.JFIF").shape == load_image(tmp_path / "c.jpg").shape


def test_hidden_and_thumbnail_folders_are_not_searched_and_said(tmp_path, caplog):
    """A NAS's thumbnails (@eaDir), a viewer's .thumbnails and macOS zips' __MACOSX were trained on as photos."""
    import logging

    from lomar.data.image_search import find_images

    for name in ("a.jpg", "sub/b.jpg", "@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg", ".thumbnails/normal/c.png",
                 "sub/__MACOSX/d.jpg", ".hidden/e.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(_jpeg())
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert find_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "sub" / "b.jpg"]
    assert any("4 hidden or thumbnail folder(s) not searched, e.g. " in r.getMessage() for r in caplog.records)
    assert find_images(tmp_path / ".hidden") == [tmp_path / ".hidden" / "e.jpg"]  # asked for by name: searched


def test_only_a_jpeg_libjpeg_may_read_several_scans_of_is_counted():
    """Counting scans reads the whole file (10 ms for a 10 MB photo, every time a worker opens it): a sequential
    frame whose first scan holds every component has one scan, as libjpeg refuses a second (JERR_EOI_EXPECTED)."""
    from lomar.data.headers import jpeg_single_scan

    pixels = (np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8)
    for mode, progressive in (("RGB", False), ("L", False), ("RGB", True), ("L", True)):
        out = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(out, format="JPEG", progressive=progressive)
        assert jpeg_single_scan(out.getvalue()) is not progressive
    assert not jpeg_single_scan(b"\xff\xd8\xff\xd9") and not jpeg_single_scan(_jpeg()[:40])
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (128, 100, 50)).save(out, format="JPEG")
    data = out.getvalue()
    start, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    scan = data[start:start + 2 + int.from_bytes(data[start + 2:start + 4], "big") + 17]  # 31 bytes, as the bomb's
    with pytest.raises(ValueError, match="bomb.jpg: broken data stream"):  # libjpeg's own refusal, at the second
        decode_bytes(data[:end] + scan * 1000 + data[end:], "bomb.jpg")


def test_a_truncated_gzipped_shard_keeps_what_precedes_the_damage(tmp_path):
    # gzip raises EOFError (neither OSError nor TarError) at a cut-off stream: the count, the tokenizer's draw and
    # the loader's readers crashed on it instead of skipping the damage
    whole, shard = tmp_path / "whole.tar.gz", tmp_path / "a.tar.gz"
    rng = np.random.RandomState(0)
    with tarfile.open(whole, "w:gz") as archive:
        for i in range(40):  # noise: gzip cannot shrink it, so the cut falls among the members
            _add(archive, f"{i:02d}.jpg", _jpeg() + rng.bytes(2000))
    shard.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    dataset = TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=1)
    count = dataset.count_samples()
    assert 0 < count < 40 and "damaged after some samples" in dataset.damaged[str(shard)]
    assert len(list(dataset)) in (count - 1, count)  # the count reads headers: the member cut off in its data too
    assert 0 < len(list(TarShardDataset([shard], PretrainTransform(16)).spread(4))) <= 4


def test_an_image_pillow_fails_to_decode_with_its_own_value_error_is_named():
    # a GIF whose frame is 0x0 (found by mutating frame headers): Pillow's ValueError at load names no file, and
    # finetune's, detect's and segment's skip warnings print the message alone
    out = io.BytesIO()
    Image.new("P", (4, 3), 1).save(out, format="GIF")
    data = bytearray(out.getvalue())
    frame = data.index(b"\x2c", 13)  # the image descriptor: left, top, width, height (little-endian)
    struct.pack_into("<HH", data, frame + 5, 0, 0)
    with pytest.raises(ValueError, match=r"^cannot decode image frame\.gif: tile cannot extend outside image$"):
        decode_bytes(bytes(data), "frame.gif")


def test_a_skipped_sample_whose_error_has_no_message_is_named_by_the_errors_type(caplog):
    """A damaged file can raise an exception without a message (an EOFError(), a SyntaxError without text): the
    skip line quotes its type, where taking the first line of an empty message failed with an IndexError inside a
    loader worker (errors.exception_line, which every decode message quotes an exception by)."""
    from lomar.data.collate import Skipped
    from lomar.errors import exception_line

    assert Skipped.warned(EOFError(), 3, set()) == "EOFError"
    assert exception_line(ValueError("cannot decode image a.png: broken\ntraceback-like detail")) == (
        "cannot decode image a.png: broken")
