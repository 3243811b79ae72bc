"""Class-folder datasets on odd but legal data: what is the file's fault and what is not."""

import numpy as np
import pytest
from PIL import Image

from lomar.data.folder import LabelledImageFolder


def _folder(root):
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(root / label / "0.png")
    (root / "dog" / "broken.png").write_bytes(b"garbage")
    return root


def test_a_failing_transform_is_raised_not_counted_as_an_unreadable_image(tmp_path):
    """A readable image whose augmentation fails is a bug, not a bad file: counted as unreadable, a RandAugment op
    failing now and then blamed as many files and stopped long runs with 'fix or remove them'."""
    def failing(image):
        raise ValueError("bits must be between or equal to 1 and 8")

    dataset = LabelledImageFolder(_folder(tmp_path), failing)
    with pytest.raises(ValueError, match="bits must be"):
        dataset[0]
    image, label, path = dataset[2]  # an unreadable file is still skipped, not raised
    assert image is None and path.endswith("broken.png") and label == 1 and dataset[2].source is None


def test_class_names_in_two_unicode_forms_are_told_apart(tmp_path):
    """A split copied from macOS names 'café' decomposed (e + U+0301), one made on Linux composed: the names print
    alike, so the message must say what differs."""
    import unicodedata

    for split, form in (("train", "NFD"), ("val", "NFC")):
        for label in ("café", "dog"):
            (tmp_path / split / unicodedata.normalize(form, label)).mkdir(parents=True)
            Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(tmp_path / split / unicodedata.normalize(form, label)
                                                                   / "0.png")
    train, val = LabelledImageFolder(tmp_path / "train"), LabelledImageFolder(tmp_path / "val")
    with pytest.raises(ValueError) as caught:
        train.match_classes(val)
    assert r"('cafe\u0301' and 'caf\xe9' are one name in two Unicode forms" in str(caught.value)
    assert "\n" not in str(caught.value)
    other = LabelledImageFolder(_folder(tmp_path / "plain"))
    with pytest.raises(ValueError) as caught:
        train.match_classes(other)
    assert "Unicode" not in str(caught.value)  # names that differ in letters: the plain message


def test_thumbnail_caches_are_no_class(tmp_path, caplog):
    """A Synology NAS writes @eaDir/IMAGE/SYNOFILE_THUMB_*.jpg in every folder, train/ and val/ alike: taken as a
    class, every image's thumbnails trained (and scored) as one more class, without a word."""
    import logging

    root = _folder(tmp_path / "train")
    for name in ("@eaDir/0.png", "__MACOSX/dog"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(root / name / "SYNOFILE_THUMB_M.png")
    (root / ".ipynb_checkpoints").mkdir()
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        dataset = LabelledImageFolder(root)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 3
    assert "2 thumbnail folder(s) are no class, e.g. @eaDir" in caplog.text


def test_a_truncated_webp_is_named_as_one(tmp_path):
    """Pillow's WebP opener reads the whole file, so a WebP cut short failed at open, and the message called it 'not an
    image format lomar reads (JPEG, PNG, GIF, BMP, TIFF, WebP; ... starting b'RIFF')'."""
    import io

    from lomar.data.decode import decode_bytes

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buffer, "WEBP")
    with pytest.raises(ValueError, match=r"^cannot decode image cut.webp: a damaged or truncated WEBP file "
                                         r"\([\d,]+ bytes\); replace or remove it$"):
        decode_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2], "cut.webp")


def test_what_the_class_folders_pass_over_is_said_once_for_the_split(tmp_path, caplog):
    """A NAS's @eaDir (and macOS's ._IMAGE files) sit in every class folder: one warning per class was 1,000 lines
    for ImageNet, per split."""
    import logging

    for label in ("cat", "dog", "owl"):
        (tmp_path / label / "@eaDir").mkdir(parents=True)
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(tmp_path / label / "0.png")
        (tmp_path / label / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        dataset = LabelledImageFolder(tmp_path)
    assert len(dataset) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{tmp_path}: 3 hidden or thumbnail folder(s) not searched, e.g. {tmp_path / 'cat'}")
    assert lines[1] == f"{tmp_path}: 3 macOS metadata file(s) named ._IMAGE skipped (AppleDouble, not images)"


def test_an_unreadable_file_is_warned_of_once_not_every_epoch(tmp_path, caplog):
    import logging

    dataset = LabelledImageFolder(_folder(tmp_path))
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        for _epoch in range(3):
            assert [dataset[i][0] is None for i in range(len(dataset))] == [False, False, True]
    assert [r.getMessage() for r in caplog.records if "broken.png" in r.getMessage()] == [
        f"skipped an unreadable image: cannot decode image {tmp_path / 'dog' / 'broken.png'}: not an image format "
        f"lomar reads (JPEG, PNG, GIF, BMP, TIFF, WebP; 7 bytes starting b'garbage')"]


def test_a_class_folder_linked_to_nowhere_is_named(tmp_path, caplog):
    """A class linked to an unmounted disk is no folder: the class left both splits without a word."""
    import logging

    root = _folder(tmp_path / "train")
    (root / "owl").symlink_to(tmp_path / "unmounted" / "owl", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert LabelledImageFolder(root).classes == ["cat", "dog"]
    assert f"1 link(s) lead nowhere, e.g. owl -> {tmp_path / 'unmounted' / 'owl'}: no class; mount its target" in \
        caplog.text


def test_photos_in_formats_lomar_does_not_read_are_named(tmp_path, caplog):
    """An iPhone saves HEIC: a class of them was an empty class, a mixed one lost them, each without a word about
    the format."""
    import logging

    root = _folder(tmp_path / "train")
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "x.avif"):
        (root / "cat" / name).write_bytes(b"\x00\x00\x00\x18ftypheic")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert len(LabelledImageFolder(root)) == 3
    assert (f"{root}: 3 image(s) in a format lomar does not read, e.g. {root / 'cat' / 'IMG_0001.HEIC'}, are not "
            f"used; convert them to JPEG or PNG") in caplog.text
