"""COCO polygons reaching far outside their image: clipped before pycocotools rasterises them, which
took seconds a load at 1e7 px and crashed the process (a segmentation fault) past 4.3e8 px."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from crafted import grey_png
from lomar.data.coco import detection_dataset, read_coco, training_split
from lomar.data.jitter import train_transforms
from lomar.data.polygons import fit_polygons
from lomar.errors import UsageError

WIDTH, HEIGHT = 48, 40


def _split(tmp_path, polygon, area=None):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    ann = {"id": 1, "image_id": 1, "category_id": 4, "bbox": [5, 5, 20, 20], "segmentation": [polygon]}
    if area is not None:
        ann["area"] = area
    data = {"images": [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT}], "annotations": [ann],
            "categories": [{"id": 4, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return read_coco(tmp_path / "ann.json", tmp_path / "images")


def _mask(polygons):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, HEIGHT, WIDTH)))


@pytest.mark.parametrize("far", [1e5, 3e4])
def test_a_clipped_polygon_covers_the_pixels_the_original_does(far):
    # concave, with vertices far out on every side: what pycocotools rasterises inside the image is unchanged
    polygon = [-far, -far, 20.3, 7.7, far, -far / 3, 30.5, 20.2, far, far, 21.1, 33.9, -far / 2, far, 9.4, 18.6]
    fitted, clipped = fit_polygons([polygon], WIDTH, HEIGHT)
    assert clipped == 1
    assert all(-WIDTH <= x <= 2 * WIDTH for x in fitted[0][0::2])
    assert all(-HEIGHT <= y <= 2 * HEIGHT for y in fitted[0][1::2])
    assert 0 < _mask(fitted).sum() < WIDTH * HEIGHT
    assert (_mask(fitted) == _mask([polygon])).all()


def test_a_polygon_near_its_image_is_left_as_it_is():
    polygon = [-10.0, -3.5, 60.0, 2.0, 90.0, 79.0]  # outside, but within a side's length
    assert fit_polygons([polygon], WIDTH, HEIGHT) == ([polygon], 0)


def test_a_vertex_past_pycocotools_integers_is_clipped_before_it_is_rasterised(tmp_path):
    split = _split(tmp_path, [10, 10, 1e9, 10, 10, 1e9], area=100.0)
    polygon = split.data["annotations"][0]["segmentation"][0]
    assert max(polygon) <= 2 * WIDTH  # the raw polygon crashed the process wherever it was rasterised
    assert "1 polygons reaching far outside their image clipped" in split.summary.line()
    image, target = detection_dataset(training_split(split), train_transforms(64, (1.0, 1.0)), train=True, seed=0)[0]
    assert target["masks"].shape[1:] == image.shape[1:] and target["masks"].any()


def test_the_area_left_out_is_counted_on_the_clipped_polygon(tmp_path):
    split = _split(tmp_path, [0, 0, 1e12, 0, 1e12, 1e12])  # a triangle over the image's upper-right half
    ann = split.data["annotations"][0]
    assert ann["area"] == float(_mask(ann["segmentation"]).sum()) > WIDTH * HEIGHT / 3


def test_a_far_polygon_that_misses_the_image_leaves_an_empty_mask(tmp_path):
    fitted, clipped = fit_polygons([[-1e9, -1e9, -1e9 + 5, -1e9, -1e9, -1e9 + 5]], WIDTH, HEIGHT)
    assert clipped == 1 and len(fitted[0]) == 6 and _mask(fitted).sum() == 0


@pytest.mark.parametrize("segmentation, said", [(None, "has no 'segmentation'"),
                                                ([], "has as segmentation an empty polygon list")])
def test_a_box_only_file_is_one_line_that_counts_and_says_what_to_do(tmp_path, segmentation, said):
    # CVAT's and Roboflow's detection exports write "segmentation": []; the line said "fix or remove the annotation"
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    annotations = [{"id": i + 1, "image_id": 1, "category_id": 4, "bbox": [5, 5, 10, 10]} for i in range(3)]
    for ann in annotations[1:] if segmentation is None else annotations:
        ann["segmentation"] = segmentation
    annotations[2]["segmentation"] = [[5, 5, 15, 5, 15, 15]]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT}], "annotations": annotations,
            "categories": [{"id": 4, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(UsageError) as caught:
        read_coco(tmp_path / "ann.json", tmp_path / "images")
    line = str(caught.value)
    assert "\n" not in line and f"annotations[0] (id 1) {said}" in line, line
    assert "(2 of 3 annotations have no mask)" in line and "as the polygon [[x, y, x+w, y, x+w, y+h, x, y+h]]" in line


def _write(tmp_path, text: str):
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "ann.json").write_text(text)
    return tmp_path / "ann.json", tmp_path / "images"


@pytest.mark.parametrize("side", [100_000, 2_000_000_000])
def test_an_image_declared_past_the_pixel_limit_is_refused_before_its_polygons_are_rasterised(tmp_path, side):
    # 2e9 x 2e9 with a polygon over it: pycocotools crashed the process (a segmentation fault) reading the
    # file; such an image is never decoded (load_image refuses it), so its annotations could not be trained on
    ann = {"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 0, side, side],
           "segmentation": [[0, 0, side, 0, side, side, 0, side]]}
    data = {"images": [{"id": 1, "file_name": "a.png", "width": side, "height": side}], "annotations": [ann],
            "categories": [{"id": 4, "name": "thing"}]}
    with pytest.raises(UsageError, match=rf"images\[0\] \(id 1\) is {side}x{side} pixels, over the 178,956,970 an "
                                         r"image is decoded at \(LOMAR_MAX_IMAGE_PIXELS\)"):
        read_coco(*_write(tmp_path, json.dumps(data)))


@pytest.mark.parametrize("text, said", [
    ('{"images": ' + "[" * 5000 + "]" * 5000 + "}", "nests arrays or objects too deep to read"),
    ('{"images": [{"id": 1' + "0" * 5000 + "}]}", r"not valid JSON \(Exceeds the limit \(4300 digits\) for integer "
                                                  r"string conversion: value has 5001 digits\); pass a COCO")])
def test_json_that_pythons_reader_cannot_hold_is_one_line_naming_the_file(tmp_path, text, said):
    with pytest.raises(UsageError, match=f"ann.json: {said}"):  # a RecursionError, and a ValueError naming nothing
        read_coco(*_write(tmp_path, text))


def test_a_float_box_inside_its_image_is_not_counted_as_clipped(tmp_path):
    # 10.1 + 20.2 - 10.1 is not 20.2 in floats: such a box, as annotation tools write them, is not clipped
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    boxes = [[10.1, 7.7, 20.2, 30.1], [40.0, 30.0, 20.0, 5.0]]  # the second reaches past the right edge
    anns = [{"id": i + 1, "image_id": 1, "category_id": 4, "bbox": box, "segmentation": [[5, 5, 9, 5, 9, 9]]}
            for i, box in enumerate(boxes)]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT}], "annotations": anns,
            "categories": [{"id": 4, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    split = read_coco(tmp_path / "ann.json", tmp_path / "images")
    assert split.summary.clipped == 1 and "1 boxes clipped to their image" in split.summary.line()
    assert split.data["annotations"][1]["bbox"] == [40.0, 30.0, 8.0, 5.0]
    assert split.data["annotations"][0]["bbox"] == split.scored[0]["bbox"] == boxes[0]  # as the file gives it


@pytest.mark.parametrize("given, hint", [((24, 40), True), ((30, 20), False)])
def test_a_rotated_photo_given_its_stored_size_is_said_to_be_turned_by_exif(tmp_path, given, hint):
    # a tool that ignores EXIF writes the stored size, and boxes of the stored frame: that is what the file's
    # own size agrees with, so the refusal says where the other size comes from
    from lomar.data.coco_images import unusable_image

    (tmp_path / "images").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((40, 24, 3), 90, np.uint8)).save(tmp_path / "images" / "a.jpg", exif=exif)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": given[0], "height": given[1]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [2, 2, 8, 8],
                             "segmentation": [[2, 2, 10, 2, 10, 10]]}], "categories": [{"id": 4, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    split = read_coco(tmp_path / "ann.json", tmp_path / "images")
    skipped = detection_dataset(training_split(split), None, train=True)[0]
    for why in (unusable_image(split, split.data["images"][0]), skipped):
        assert f"a.jpg is 40x24 upright, but {tmp_path / 'ann.json'} gives it {given[0]}x{given[1]}" in why
        turned = "turned by its EXIF orientation: annotate the upright photo, or remove the orientation tag"
        assert (turned in why) is hint


def test_an_image_that_fails_as_its_exif_is_looked_for_is_named_in_the_reason(tmp_path):
    # a PNG without an EXIF chunk is decoded to look for one after its pixels: its pixel data, cut short rows
    # before its IHDR's height (CRCs right), fails there with an OSError that names no file
    from lomar.data.coco_images import unusable_image

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(grey_png(8, 6, b"\x00" + bytes([7]) * 8))  # 1 row of 6
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6}], "annotations": [],
            "categories": [{"id": 4, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    split = read_coco(tmp_path / "ann.json", tmp_path / "images")
    why = unusable_image(split, split.data["images"][0])
    assert why.startswith(f"cannot decode image {tmp_path / 'images' / 'a.png'}: its PNG pixel data ends"), why
