"""ADE20K-layout segmentation folders: the up-front check reads what the loader will read."""

import os
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from test_pathtable import _copied_by_reading

from lomar.data.collate import Skipped
from lomar.data.segmentation import (
    IGNORE,
    MEAN,
    STD,
    SegmentationFolder,
    class_names,
    collate_segmentation,
    read_labels,
)


def _layout(root, image_size, label_size, orientation=1):
    """One training pair: a photo stored ``image_size`` (width, height) with an EXIF orientation, and
    labels of ``label_size`` (width, height)."""
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = (np.random.RandomState(0).rand(image_size[1], image_size[0], 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "images" / "training" / "a.jpg", exif=exif)
    Image.fromarray(np.ones(label_size[::-1], dtype=np.uint8)).save(root / "annotations" / "training" / "a.png")


def test_labels_follow_the_photo_as_displayed(tmp_path):
    _layout(tmp_path, (40, 24), (24, 40), orientation=6)  # stored landscape, shown portrait: labels portrait
    data = SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
    image, labels = data.load(0)
    assert image.shape[-2:] == labels.shape == (40, 24)


def test_labels_at_the_stored_size_of_a_rotated_photo_are_refused(tmp_path):
    _layout(tmp_path, (40, 24), (40, 24), orientation=6)
    with pytest.raises(ValueError, match=r"is 40x24 but its image a.jpg is 24x40; write the annotation at the "
                                         r"image's size \(the photo is stored 40x24, shown 24x40 as its EXIF "
                                         r"orientation says: draw the labels on the upright photo\)$"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)


def test_labels_of_another_size_than_an_unturned_photo_do_not_name_exif(tmp_path):
    _layout(tmp_path, (40, 24), (24, 40))
    with pytest.raises(ValueError, match=r"is 24x40 but its image a.jpg is 40x24; write the annotation at the "
                                         r"image's size$"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)


def test_an_annotation_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    _layout(tmp_path, (40, 24), (40, 24))
    labels = tmp_path / "annotations" / "training" / "a.png"
    labels.unlink()
    os.mkfifo(labels)
    errors = []

    def build():
        try:
            SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
        except ValueError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "building the dataset blocked on a FIFO"
    assert errors and "named pipe" in errors[0] and "\n" not in errors[0]


def test_the_num_classes_to_suggest_is_the_highest_id_of_the_split(tmp_path):
    _layout(tmp_path, (16, 16), (16, 16))
    for stem, top in (("b", 7), ("c", 12), ("d", 9)):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / "training" / f"{stem}.jpg")
        labels = np.ones((16, 16), dtype=np.uint8)
        labels[0, 0] = top
        Image.fromarray(labels).save(tmp_path / "annotations" / "training" / f"{stem}.png")
    with pytest.raises(ValueError, match=r"c.png holds class id 12, .* pass --num-classes 12 or fix"):
        SegmentationFolder(tmp_path, "training", num_classes=5, crop=16, workers=2)
    assert len(SegmentationFolder(tmp_path, "training", num_classes=12, crop=16, workers=2)) == 4


def test_255_is_ignored_as_mmseg_does_and_ids_above_254_are_refused(tmp_path):
    _layout(tmp_path, (16, 16), (16, 16))
    labels = np.ones((16, 16), dtype=np.uint8)
    labels[0, :4] = (0, 255, 2, 1)
    Image.fromarray(labels).save(tmp_path / "annotations" / "training" / "a.png")
    data = SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)  # 255 is no class id
    assert data.load(0)[1][0, :4].tolist() == [255, 255, 1, 0]
    Image.fromarray(np.full((16, 16), 300, dtype=np.uint16)).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(ValueError, match=r"a.png holds class id 300; ids are 1..254 for the classes, 0 and 255 "
                                         r"ignored; fix the annotations"):
        SegmentationFolder(tmp_path, "training", num_classes=254, crop=16, workers=1)


def test_a_negative_class_id_is_refused_at_start_not_in_a_loader_worker(tmp_path):
    # a 32-bit image saved under a .png name (a TIFF): its -1 passed the highest-id check, then bincount raised
    _layout(tmp_path, (16, 16), (16, 16))
    labels = np.ones((16, 16), dtype=np.int32)
    labels[0, 0] = -1
    Image.fromarray(labels).save(tmp_path / "annotations" / "training" / "a.png", format="TIFF")
    with pytest.raises(ValueError, match=r"a.png holds class id -1; class ids are not negative"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)


def test_zero_label_class_reads_0_as_the_first_class_and_checks_ids_below_n(tmp_path):
    """reduce_zero_label=False (VOC-style, binary masks): the file's 0..N-1 are the classes, only 255 ignored; an
    id of N or more is refused naming the value, the file and the fix. The default keeps ADE's 1..N."""
    _layout(tmp_path, (16, 16), (16, 16))
    labels = np.ones((16, 16), dtype=np.uint8)
    labels[0, :4] = (0, 255, 2, 1)
    path = tmp_path / "annotations" / "training" / "a.png"
    Image.fromarray(labels).save(path)
    data = SegmentationFolder(tmp_path, "training", num_classes=3, crop=16, workers=1, reduce_zero_label=False)
    assert data.load(0)[1][0, :4].tolist() == [0, 255, 2, 1]
    with pytest.raises(ValueError) as caught:
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1, reduce_zero_label=False)
    message = str(caught.value)
    assert "\n" not in message and f"annotation {path} holds class id 2, above the ids 0..1 of --num-classes 2" \
        in message and "pass --num-classes 3, or --zero-label ignore if the ids are 1..N" in message, message
    assert SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1).load(0)[1][0, :4].tolist() \
        == [255, 255, 1, 0]  # ADE's convention for the same file: 2 is its second class


def test_two_images_of_one_stem_are_refused(tmp_path):
    _layout(tmp_path, (16, 16), (16, 16))
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / "training" / "a.png")
    with pytest.raises(ValueError, match=r"images a.jpg and a.png in .* share the stem 'a'"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)


def test_pairs_in_a_subfolder_are_said_to_be_unused_not_dropped_unsaid(tmp_path, caplog):
    _layout(tmp_path, (16, 16), (16, 16))
    for kind, name in (("images", "a.jpg"), ("annotations", "a.png")):
        for sub in ("sub", ".cache"):  # a hidden folder is passed over as a folder search passes it, unsaid here
            (tmp_path / kind / "training" / sub).mkdir()
            (tmp_path / kind / "training" / sub / name).write_bytes((tmp_path / kind / "training" / name).read_bytes())
    with caplog.at_level("WARNING", logger="lomar.data"):
        data = SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
    assert len(data) == 1 and "1 subfolder(s) not searched, e.g. sub:" in caplog.text


def test_hidden_images_and_annotations_are_left_out_and_said_as_a_folder_search_leaves_them(tmp_path, caplog):
    # .b.jpg and its .b.png were trained on, and a hidden .c.jpg without one stopped segment (no annotation)
    _layout(tmp_path, (16, 16), (16, 16))
    for kind, name, copy in (("images", "a.jpg", ".b.jpg"), ("annotations", "a.png", ".b.png"),
                             ("images", "a.jpg", ".c.jpg")):
        (tmp_path / kind / "training" / copy).write_bytes((tmp_path / kind / "training" / name).read_bytes())
    with caplog.at_level("WARNING", logger="lomar.data"):
        data = SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
    assert len(data) == 1
    assert "2 hidden image file(s) not used, e.g. .b.jpg" in caplog.text


def test_a_symlink_loop_beside_the_images_is_passed_over(tmp_path):
    _layout(tmp_path, (16, 16), (16, 16))
    (tmp_path / "images" / "training" / "loop").symlink_to(tmp_path / "images" / "training" / "loop")
    assert len(SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)) == 1


def test_an_image_cut_short_is_skipped_and_its_place_filled(tmp_path, caplog):
    _layout(tmp_path, (64, 48), (64, 48))
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / "training" / "b.jpg")
    Image.fromarray(np.ones((48, 64), dtype=np.uint8)).save(tmp_path / "annotations" / "training" / "b.png")
    photo = tmp_path / "images" / "training" / "a.jpg"
    photo.write_bytes(photo.read_bytes()[:len(photo.read_bytes()) // 2])  # the header reads; the pixels do not
    data = SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
    with caplog.at_level("WARNING", logger="lomar.data"):
        items = [data[0, 0], data[1, 0]]
    assert isinstance(items[0], Skipped) and "a.jpg" in items[0] and "a.jpg" in caplog.text
    images, labels = batch = collate_segmentation(items)
    assert images.shape == (2, 3, 16, 16) and torch.equal(images[0], images[1]) and labels.shape == (2, 16, 16)
    assert batch.bad == [items[0]]  # the run counts it (lomar.train.skipped_files.SkippedFiles)
    nothing = collate_segmentation([items[0]])
    assert nothing[0].shape == (0,) and nothing.bad == [items[0]]


def test_hsv_round_trips_and_matches_colorsys():
    import colorsys

    from lomar.data.segmentation import _hsv_to_rgb, _rgb_to_hsv

    image = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(_hsv_to_rgb(*_rgb_to_hsv(image)), image)
    hue, sat, value = _rgb_to_hsv(image)
    for y, x in ((0, 0), (5, 9), (15, 3)):
        h, s, v = colorsys.rgb_to_hsv(*(image[:, y, x] / 255).tolist())
        assert (float(hue[y, x]), float(sat[y, x]), float(value[y, x])) == pytest.approx((h * 180, s, v * 255),
                                                                                          abs=1e-4)


def test_photometric_distortion_is_mmsegs_four_coin_steps():
    from lomar.data.segmentation import photometric_distortion

    image = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(1)).float()
    outs = [photometric_distortion(image, torch.Generator().manual_seed(s)) for s in range(400)]
    assert all(o.min() >= 0 and o.max() <= 255 and torch.equal(o, o.round()) for o in outs)
    unchanged = sum(torch.equal(o, image) for o in outs)
    assert 10 < unchanged < 45  # each of the four steps is skipped with probability 1/2: 400/16 = 25 expected
    again = photometric_distortion(image, torch.Generator().manual_seed(7))
    assert torch.equal(again, outs[7])  # a function of the sample's generator


def test_the_distortion_changes_pixels_only(tmp_path):
    _layout(tmp_path, (40, 32), (40, 32))
    plain = SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1, photometric=False)
    distorted = SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
    changed = 0
    for epoch in range(8):
        (a, la), (b, lb) = plain[(0, epoch)], distorted[(0, epoch)]
        assert torch.equal(la, lb)  # the same crop and flip: the distortion draws after them
        changed += not torch.equal(a, b)
    assert changed >= 4


def test_labels_stay_on_the_image_through_the_random_rescale(tmp_path):
    # "nearest" sampled floor(x * in / out): the labels sat up to half a pixel right of and below the bilinear image,
    # 25-52 pixels of a 285-1140 pixel rectangle disagreeing with the image's own
    for split in ("images", "annotations"):
        (tmp_path / split / "training").mkdir(parents=True)
    inside = np.zeros((100, 120), bool)
    inside[30:61, 41:80] = True
    Image.fromarray(np.repeat(inside[..., None] * 255, 3, 2).astype(np.uint8)).save(tmp_path / "images/training/a.png")
    Image.fromarray(np.where(inside, 1, 2).astype(np.uint8)).save(tmp_path / "annotations/training/a.png")
    data = SegmentationFolder(tmp_path, "training", num_classes=2, crop=64, workers=1, photometric=False)
    for epoch in range(8):
        image, labels = data[(0, epoch)]
        bright = (image * STD + MEAN)[0] > 127.5
        keep = labels != IGNORE
        assert (bright[keep] != (labels[keep] == 0)).sum() <= 1  # a tie at an edge at most


def test_the_evaluation_scale_rounds_halves_up_as_mmcv_does():
    from lomar.data.segmentation import eval_scale

    assert eval_scale(1024, 1365, 512) == (512, 683)  # 682.5: Python's round() gave 682
    assert eval_scale(1365, 1024, 512) == (683, 512)
    assert eval_scale(37, 53, 32) == (32, 46)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")
def test_forked_workers_do_not_copy_the_pair_lists(tmp_path, monkeypatch):
    # 20,000 pairs (ADE20K's count; COCO-Stuff has 118k): a list of (Path, Path) tuples that a worker writes to (a
    # refcount per item) grew 8.9-13 MiB (3.3 over 5,000); packed as lomar.data.pathtable packs image lists: 1.0-1.1.
    # The allocator's churn varies by up to 2 MiB between runs (2.1 over 5,000 in one CI run), hence the count
    count = 20_000
    monkeypatch.setattr("lomar.data.segmentation._pairs", lambda root, split: [
        (root / "images" / f"ADE_{i:08d}.jpg", root / "annotations" / f"ADE_{i:08d}.png") for i in range(count)])
    monkeypatch.setattr("lomar.data.segmentation._check_pair", lambda image, annotation: (1, 2))
    data = SegmentationFolder(tmp_path, "validation", num_classes=2, crop=8, train=False, workers=1)
    monkeypatch.setattr("lomar.data.segmentation.read_labels", lambda path: np.ones((8, 8), np.uint8))
    monkeypatch.setattr("lomar.data.segmentation.load_image", lambda path: torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert data[count - 1][2] == f"ADE_{count - 1:08d}" and len(data) == count
    copied = _copied_by_reading(data.__getitem__, count)
    assert copied < 4, copied


def test_class_names_are_read_from_ades_class_list(tmp_path):
    assert class_names(tmp_path, 3) is None  # no list: the ids name the classes
    (tmp_path / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n"
                                                "2\t0.1072\t6046\t612\tbuilding, edifice\n3\t0.0878\t8265\t796\tsky\n")
    assert class_names(tmp_path, 3) == ["wall", "building", "sky"]  # the first synonym, as mmseg's list
    assert class_names(tmp_path, 4) is None  # a list of other classes than --num-classes says
    # ADE's own file holds ids followed by a space ("22 \t"); a row of a digit int() does not read is no class
    (tmp_path / "objectInfo150.txt").write_text("Idx\tName\n1\twall\n2 \tsky\n3\tfloor\n3\u00b2\tbed\n")
    assert class_names(tmp_path, 3) == ["wall", "sky", "floor"]


@pytest.mark.parametrize("pixels, mode, said", [
    ([(0, 0, 0), (255, 0, 0), (0, 255, 0)], "RGB",
     "is an RGB colour mask of 3 colours ((0, 0, 0), (0, 255, 0), (255, 0, 0)): map each colour to its class id; "),
    ([(0, 0, 0), (2, 2, 2), (1, 1, 1)], "RGB", "is an RGB image whose channels are equal: a grey mask saved in colour, "
                                               "its ids in any one channel (Pillow: .convert('L') keeps them); "),
    ([(0, 255), (1, 255), (1, 255)], "LA", "is an LA image; "),
    ([(255, 0, 0)] * 3, "RGB", "is an RGB colour mask of 1 colour ((255, 0, 0)): map each colour to its class id; "),
])
def test_an_annotation_in_colour_is_refused_naming_its_colours_or_its_grey(tmp_path, pixels, mode, said):
    """A colour mask needs its colours mapped to ids, which only its maker knows; a grey one saved as RGB holds them."""
    path = tmp_path / "a.png"
    Image.fromarray(np.array(pixels, np.uint8).reshape(1, 3, -1), mode).save(path)
    with pytest.raises(ValueError) as refused:
        read_labels(path)
    assert str(refused.value) == (f"annotation {path} {said}write class ids as a single-channel (mode L or P) PNG of "
                                  f"class ids")
