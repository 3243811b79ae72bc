"""How image lists are read: .txt lists written by find over copied disks, and their paths' normal form."""

import logging
import random
from pathlib import Path

from helpers import write_images
from lomar.data.folder import build_image_list
from lomar.data.pathtable import join_text


def test_join_text_gives_the_strings_path_objects_give():
    rng = random.Random(0)
    pieces = ["a", "b", ".", "/", "..", " ", "._x", "é"]
    for folder in (".", "/", "//", "/x/y", "rel", "rel/sub", "//net"):
        for _ in range(800):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
            expected = str(Path(text)) if Path(text).is_absolute() else str(Path(folder) / text)
            assert join_text(folder, text) == expected, (folder, text)


def test_a_find_written_list_leaves_out_macos_metadata_and_thumbnails(tmp_path, caplog):
    (tmp_path / "a.jpg").write_bytes(b"x")
    listing = tmp_path / "list.txt"  # find . -name '*.jpg' on a photo folder copied from a Mac to a Synology NAS
    listing.write_text("./a.jpg\n./._a.jpg\n./sub/._b.jpg\n./@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg\n./__MACOSX/._c.jpg\n"
                       "./my._photo.jpg\n./x@eaDir/d.jpg\n./#recycle/e.jpg\n./#snapshot/GMT+00_2026.12.01/a.jpg\n")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        images = build_image_list(listing)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a.jpg", "my._photo.jpg", "x@eaDir/d.jpg"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{listing}: 6 line(s) name macOS metadata files (._NAME) or files in thumbnail or system folders (@eaDir, "
        f"__MACOSX, #recycle, #snapshot, $RECYCLE.BIN, System Volume Information, lost+found), e.g. "
        f"{tmp_path / '._a.jpg'}; left out, as a folder search leaves them out"]
    listing.write_text("./a.jpg\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert list(build_image_list(listing)) == [tmp_path / "a.jpg"] and not caplog.records


def test_a_list_kept_inside_a_snapshot_folder_names_its_photos(tmp_path):
    # a folder search of a NAS's snapshot copy finds its photos (it judges the folders below its root only), so the
    # list beside them must too: every line was left out as 'in a system folder', then 'no images found'
    folder = tmp_path / "#snapshot" / "GMT+00_2026.12.01" / "photos"
    (folder / "@eaDir").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "@eaDir/a.jpg"):
        (folder / name).write_bytes(b"x")
    listing = folder / "list.txt"
    listing.write_text(f"a.jpg\n{folder / 'b.jpg'}\n@eaDir/a.jpg\n._a.jpg\n{tmp_path / '#recycle' / 'c.jpg'}\n")
    assert list(build_image_list(listing)) == [folder / "a.jpg", folder / "b.jpg"]
    assert list(build_image_list(folder)) == [folder / "a.jpg", folder / "b.jpg"]


def test_class_folders_reaching_one_folder_through_a_link_are_said(tmp_path, caplog):
    from lomar.data.folder import LabelledImageFolder

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            write_images(tmp_path / split / name, 1)
    (tmp_path / "train" / "kitty").symlink_to("cat")  # an alias: every cat is a kitty too, under another label
    write_images(tmp_path / "val" / "kitty", 1)
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        train, val = LabelledImageFolder(tmp_path / "train"), LabelledImageFolder(tmp_path / "val")
        train.match_classes(val)
    # followed, as torchvision does
    assert train.targets == [0, 1, 2] and train.paths.text(2).endswith("kitty/img000.png")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'train'}: 1 pair(s) of class folders reach one folder through a link, e.g. "
        f"{tmp_path / 'train' / 'kitty'} (class kitty) is {tmp_path / 'train' / 'cat'} (class cat): its images are "
        f"samples of both classes, under two labels; remove the link, or copy the images that belong to both"]
    (tmp_path / "val" / "dog" / "img000.png").unlink()
    (tmp_path / "val" / "dog").rmdir()
    (tmp_path / "val" / "dog").symlink_to(tmp_path / "train" / "dog")  # a held-out split made of links to train's
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        train.match_classes(LabelledImageFolder(tmp_path / "val"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'train'} and {tmp_path / 'val'} share 1 folder(s) through links, e.g. {tmp_path / 'val' / 'dog'}:"
        f" their images are trained on and scored; give the held-out split images of its own"]


def test_a_held_out_split_nested_in_the_training_one_is_said_to_be_nested_not_linked(tmp_path, caplog):
    """lomar knn --train ds --val ds/val: the shared folders are reached by nesting, and no link is involved."""
    import pytest

    from lomar.data.folder import LabelledImageFolder

    for name in ("cat", "dog", "val/cat"):
        write_images(tmp_path / name, 1)
    with caplog.at_level(logging.WARNING, logger="lomar.data"), pytest.raises(ValueError, match="only in"):
        LabelledImageFolder(tmp_path).match_classes(LabelledImageFolder(tmp_path / "val"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path} and {tmp_path / 'val'} share 1 folder(s) by nesting ({tmp_path / 'val'} lies in {tmp_path}), "
        f"e.g. {tmp_path / 'val' / 'cat'}: their images are trained on and scored; give the held-out split images of "
        f"its own"]


def _shard(path: Path, members: int = 2) -> bytes:
    import io
    import tarfile

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (24, 24), "red").save(out, format="JPEG")
    with tarfile.open(path, "w") as archive:
        for i in range(members):
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = len(out.getvalue())
            archive.addfile(info, io.BytesIO(out.getvalue()))
    return path.read_bytes()


def test_gzipped_shards_are_read_and_bzip2_or_xz_ones_refused_in_one_line(tmp_path):
    import bz2
    import gzip
    import lzma

    import pytest

    from lomar.data.folder import build_pretrain_dataset

    plain = _shard(tmp_path / "plain.tar")
    (tmp_path / "s-000.tar.gz").write_bytes(gzip.compress(plain))
    (tmp_path / "s-001.tgz").write_bytes(gzip.compress(plain))
    for data in (str(tmp_path / "s-*.tar.gz"), str(tmp_path / "s-001.tgz"), str(tmp_path / "s-{000..000}.tar.gz")):
        dataset = build_pretrain_dataset(data, 16)
        assert dataset.count_samples() == 2 and not dataset.damaged, data  # decoding: as for a plain shard
    (tmp_path / "b.tar").write_bytes(bz2.compress(plain))  # a compressed shard named .tar: tarfile reads it unsaid
    (tmp_path / "x.tar.xz").write_bytes(lzma.compress(plain))
    for data, kind, command in ((tmp_path / "b.tar", "bzip2", "bunzip2 -c"), (tmp_path / "x.tar.xz", "xz", "xz -dc")):
        with pytest.raises(ValueError, match=rf"^tar shard {data} is {kind}-compressed, whose decompression costs .* "
                                             rf"decoding its images, each epoch and again at every start; decompress "
                                             rf"it \({command} {data} > NEW.tar\), or gzip the tar"):
            build_pretrain_dataset(str(data), 16)


def test_the_not_searched_warning_gives_the_rename_advice_only_for_a_hidden_folder(tmp_path, caplog):
    from lomar.data.image_search import find_images

    for name in ("a.jpg", "@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg", "z/.thumbnails/a.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        find_images(tmp_path)
        (tmp_path / "z" / ".thumbnails" / "a.png").unlink()
        (tmp_path / "z" / ".thumbnails").rmdir()
        find_images(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: 2 hidden or thumbnail folder(s) not searched, e.g. {tmp_path / 'z' / '.thumbnails'} (name it "
        f"without a leading '.' to use its images)",
        f"{tmp_path}: 1 hidden or thumbnail folder(s) not searched, e.g. {tmp_path / '@eaDir'} (thumbnails a NAS or a "
        f"macOS zip made of the photos)"]


def test_shard_members_in_folders_a_search_passes_over_are_skipped_and_said(tmp_path, caplog):
    import io
    import tarfile

    from lomar.data.shards import TarShardDataset
    from lomar.data.transforms import PretrainTransform

    with tarfile.open(tmp_path / "nas.tar", "w") as archive:  # tar cf of a Synology share: thumbnails beside photos
        for name in ("p/a.jpg", "p/@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg", "p/@eaDir/a.jpg/SYNOPHOTO_THUMB_XL.jpg",
                     "__MACOSX/p/b.jpg", "p/my@eaDir.jpg", "#recycle/p/c.jpg", "#snapshot/GMT+00_2026/p/a.jpg",
                     ".thumbnails/a.jpg", "./p/d.jpg"):  # tar cf ROOT.: ./ is the archive's root, not hidden
            info = tarfile.TarInfo(name)
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
    dataset = TarShardDataset([tmp_path / "nas.tar"], PretrainTransform(16), shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert dataset.count_samples() == 3
    assert [item["path"] for item in dataset] == [f"{tmp_path / 'nas.tar'}:{n}" for n in ("p/a.jpg", "p/my@eaDir.jpg",
                                                                                           "./p/d.jpg")]
    assert [r.getMessage() for r in caplog.records] == [
        f"tar shards: 6 member(s) in hidden, thumbnail or recycle-bin folders skipped, e.g. {tmp_path / 'nas.tar'}:"
        f"p/@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg (as a folder search passes them over)"]


def test_hidden_shard_members_are_skipped_and_said_as_a_folder_search_leaves_hidden_files_out(tmp_path, caplog):
    # a tar of a folder keeps its hidden files: .b.jpg was trained on from the shard and left out of the folder
    import io
    import tarfile

    from lomar.data.shard_members import drawn_members, read_ahead
    from lomar.data.shards import TarShardDataset
    from lomar.data.transforms import PretrainTransform

    shard = tmp_path / "photos.tar"
    with tarfile.open(shard, "w") as archive:
        for name in ("p/a.jpg", "p/.b.jpg", ".c.jpg", "./.d.jpg", "p/._a.jpg", "./p/e.jpg"):  # ._a.jpg: no image
            info = tarfile.TarInfo(name)
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
    said = [f"tar shards: 3 hidden image member(s) skipped, e.g. {shard}:p/.b.jpg (as a folder search leaves out a "
            f"hidden file; name it without a leading '.' to use it)"]
    kept = [f"{shard}:p/a.jpg", f"{shard}:./p/e.jpg"]
    for counted_before in (False, True):  # the count of a whole pass kept (scanned_count), or a pass of its own
        if counted_before:
            read_ahead([shard])
        dataset = TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lomar.data"):
            assert dataset.count_samples() == 2
        assert [r.getMessage() for r in caplog.records] == said
    assert [item["path"] for item in dataset] == kept
    assert [name for name, _ in drawn_members(shard, 5, random.Random(0))] == kept


def test_recycle_bins_snapshots_and_system_folders_are_no_images_and_no_class(tmp_path, caplog):
    from lomar.data.folder import LabelledImageFolder
    from lomar.data.image_search import find_images

    for name in ("cat/a.jpg", "dog/b.jpg", "#recycle/cat/old.jpg", "#snapshot/GMT+00_2026.12.01/cat/a.jpg",
                 "$RECYCLE.BIN/S-1-5-21/$R1.jpg", "System Volume Information/x.jpg", "lost+found/#1234.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert find_images(tmp_path) == [tmp_path / "cat" / "a.jpg", tmp_path / "dog" / "b.jpg"]
        assert LabelledImageFolder(tmp_path).classes == ["cat", "dog"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: 5 hidden or thumbnail folder(s) not searched, e.g. {tmp_path / '#recycle'} (deleted files, "
        f"snapshot copies or a disk's own files)",
        f"{tmp_path}: 5 recycle bin, snapshot or system folder(s) are no class, e.g. #recycle"]


def test_a_list_written_on_windows_is_refused_with_its_separator_named(tmp_path):
    import pytest

    from lomar.data.folder import build_pretrain_dataset

    (tmp_path / "train" / "n01").mkdir(parents=True)
    (tmp_path / "train" / "n01" / "a.jpg").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("train\\n01\\a.jpg\n")
    with pytest.raises(ValueError, match=r"^.*list.txt: none of its first 1 paths exists, e.g. .*train\\n01\\a.jpg; "
                                         r"its paths are separated by '\\', as Windows writes them: separate them by "
                                         r"'/'$"):
        build_pretrain_dataset(str(listing), 16)


def test_folders_are_passed_over_by_their_exact_names_not_a_prefix(tmp_path):
    """`lost+found_2` or `#recycled_paper` is a class of images like any other (a .txt list's lines are matched by
    exact folder names too); `lost+found` and `@eaDir` are not."""
    from PIL import Image

    from lomar.data.folder import LabelledImageFolder
    from lomar.data.image_names import passed_over_folder

    for name in ("lost+found_2", "#recycled_paper", "@eaDirt", "a"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "x.png")
    for name in ("lost+found", "@eaDir", ".hidden"):
        (tmp_path / name).mkdir()
    assert LabelledImageFolder(tmp_path).classes == ["#recycled_paper", "@eaDirt", "a", "lost+found_2"]
    assert [passed_over_folder(n) for n in (".", "..", ".x", "#snapshot", "#snapshots")] == [
        False, False, True, True, False]


def test_camera_raw_files_beside_jpegs_are_said_not_passed_over_silently(tmp_path, caplog):
    """A camera card copied whole holds each shot as a JPEG and a RAW: the RAWs were left out without a word."""
    from lomar.data.folder import LabelledImageFolder

    raws = ("a.CR2", "b.CR3", "c.NEF", "d.ARW", "e.DNG", "f.ORF", "g.RW2", "h.RAF", "i.PEF", "j.srw")
    for name in ("cat/x.jpg", "dog/y.jpg", "cat/._a.CR2", *(f"cat/{raw}" for raw in raws)):  # ._: copied by a Mac
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"II*\x00")  # most RAW formats (DNG, CR2, NEF, ARW) open as a TIFF does
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert list(build_image_list(tmp_path)) == [tmp_path / "cat" / "x.jpg", tmp_path / "dog" / "y.jpg"]
        assert len(LabelledImageFolder(tmp_path)) == 2
    assert [r.getMessage() for r in caplog.records] == 2 * [
        f"{tmp_path}: 10 image(s) in a format lomar does not read, e.g. {tmp_path / 'cat' / 'a.CR2'}, are not used; "
        f"convert them to JPEG or PNG"]


def test_hidden_image_files_are_left_out_as_hidden_folders_are_and_said(tmp_path, caplog):
    """A leading '.' hides a file as it hides a folder: a .NAME.jpg (an editor's or a sync tool's copy) was trained on
    without a word, where a .NAME folder beside it was left out and said. AppleDouble ._NAME files keep their line."""
    from lomar.data.folder import LabelledImageFolder

    for name in ("cat/x.jpg", "cat/.x.jpg", "dog/y.png", "dog/.z.png", "dog/._y.png", "dog/.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dog" / ".w.jpg").symlink_to(tmp_path / "cat" / "x.jpg")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert list(build_image_list(tmp_path)) == [tmp_path / "cat" / "x.jpg", tmp_path / "dog" / "y.png"]
        assert len(LabelledImageFolder(tmp_path)) == 2
    assert [r.getMessage() for r in caplog.records] == 2 * [
        f"{tmp_path}: 1 macOS metadata file(s) named ._IMAGE skipped (AppleDouble, not images)",
        f"{tmp_path}: 3 hidden image file(s) not used, e.g. {tmp_path / 'cat' / '.x.jpg'} (name it without a leading "
        f"'.' to use it)"]
