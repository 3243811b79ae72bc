"""Detection's and segmentation's default training augmentation and evaluation preprocessing, drawn hundreds of times
over crafted data holding the edges a real set holds (no annotation, crowd only, boxes on and across the border, 1 px
and 0 px wide, polygons far outside, RLE masks, a box its mask disagrees with, an empty mask, extreme aspect ratios,
images smaller than the crop, 1 x 1, EXIF-turned, grey and palette; a segmentation all ignored, of one class, of 3 px
blocks). The pixels are painted from the targets, so that a mask, box or label off its object shows on any sample:
a default that fails one draw in a few hundred does not show on one. Small sizes (128 px detection input, 64 px crops)
and a few hundred draws keep them short."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from lomar.data.coco import collate_detection_refill, detection_dataset, read_coco, training_split
from lomar.data.collate import Skipped
from lomar.data.decode import load_image
from lomar.data.jitter import eval_transforms, train_transforms
from lomar.data.polygons import fit_polygons
from lomar.data.segmentation import IGNORE, MEAN, STD, SegmentationFolder, collate_segmentation, eval_scale
from lomar.data.transforms import sample_generator
from lomar.models.mask_rcnn import FixedSizeTransform

LABEL = {3: 1, 7: 2, 11: 3}  # category id -> the model's label; objects are painted red, green 60 x label


def _exif_turned(image: Image.Image, path, **options) -> None:
    """``image`` stored turned a quarter, with the EXIF orientation (6) that shows it as given."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image.transpose(Image.ROTATE_90).save(path, exif=exif, quality=100, subsampling=0, **options)


def _rect(x, y, w, h, cat, bbox=None, **more) -> dict:
    corners = [x, y, x + w, y, x + w, y + h, x, y + h]
    return {"category_id": cat, "bbox": bbox or [x, y, w, h], "segmentation": [corners], **more}


def _rle(h, w, rows, cols, cat, compressed) -> dict:
    mask = np.zeros((h, w), np.uint8)
    mask[rows, cols] = 1
    if compressed:
        seg = {"size": [h, w], "counts": mask_utils.encode(np.asfortranarray(mask))["counts"].decode()}
    else:  # runs over the columns, alternating from 0
        flat = mask.flatten(order="F")
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        seg = {"size": [h, w], "counts": np.diff(np.concatenate([[0], edges])).tolist()}
    ys, xs = np.nonzero(mask)
    return {"category_id": cat, "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
            "segmentation": seg}


def _coco(root):
    """root/img + root/instances.json: every case of the module docstring, objects painted from their masks."""
    (root / "img").mkdir()
    data = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in LABEL]}
    far = [{"category_id": 3, "bbox": [30, 30, 34, 34], "segmentation": [[30, 30, 1e6, 30, 1e6, 1e6, 30, 1e6]]},
           {"category_id": 7, "bbox": [0, 0, 20, 20], "segmentation": [[-5e8, -5e8, 20, -5e8, 20, 20, -5e8, 20]]}]
    collinear = {"category_id": 3, "bbox": [5, 5, 20, 20], "segmentation": [[5, 5, 15, 15, 25, 25]]}
    cases = [("normal", 120, 160, [_rect(10, 15, 40, 30, 3), _rect(90, 50, 30, 60, 7), _rect(130, 5, 20, 20, 11)]),
             ("no_annotations", 60, 80, []), ("only_crowd", 60, 80, [_rect(5, 5, 40, 40, 3, iscrowd=1)]),
             ("border", 90, 120, [_rect(0, 0, 20, 15, 3), _rect(100, 75, 20, 15, 7), _rect(-10, 30, 30, 20, 11),
                                  _rect(105, -8, 30, 25, 3)]),
             ("thin", 60, 90, [_rect(30, 10, 1, 40, 3), _rect(5, 50, 70, 1, 7), _rect(80, 5, 0, 30, 11),
                               _rect(45, 45, 1, 1, 3), _rect(10, 10, 15, 15, 7)]),
             ("far_polygon", 64, 64, far),
             ("rle", 96, 72, [_rle(96, 72, slice(5, 40), slice(8, 30), 3, True),
                              _rle(96, 72, slice(50, 90), slice(30, 70), 7, False),
                              _rle(96, 72, slice(0, 96), slice(0, 2), 11, True)]),
             ("box_mask_disagree", 80, 80, [_rect(50, 50, 20, 20, 3, bbox=[0, 0, 10, 10]),
                                            _rect(5, 40, 25, 12, 7, bbox=[5, 40, 70, 35])]),
             ("empty_mask", 60, 60, [collinear, _rect(30, 30, 20, 20, 7)]), ("only_empty_mask", 60, 60, [collinear]),
             ("wide", 40, 1000, [_rect(20, 5, 100, 30, 3), _rect(900, 0, 100, 40, 7), _rect(500, 20, 2, 2, 11)]),
             ("tall", 1000, 40, [_rect(5, 20, 30, 100, 3), _rect(0, 950, 40, 50, 7)]),
             ("strip", 3, 300, [_rect(30, 0, 100, 3, 3), _rect(200, 1, 40, 1, 7)]),
             ("tiny", 6, 8, [_rect(1, 1, 3, 3, 3), _rect(5, 3, 3, 3, 7)]), ("one_pixel", 1, 1, [_rect(0, 0, 1, 1, 3)]),
             ("exif", 72, 48, [_rect(4, 6, 15, 12, 3), _rect(27, 45, 18, 24, 7)]),
             ("grey", 64, 80, [_rect(8, 8, 25, 25, 3), _rect(50, 38, 20, 20, 7)]),
             ("palette", 64, 80, [_rect(8, 32, 25, 25, 3), _rect(50, 5, 20, 20, 11)]),
             ("overlap", 80, 80, [_rect(10, 10, 40, 40, 3), _rect(25, 25, 40, 40, 7),
                                  _rect(0, 0, 80, 80, 11, iscrowd=1)]),
             ("fractional", 83, 129, [{"category_id": 3, "bbox": [2.6, 5.2, 25.1, 12.7],
                                       "segmentation": [[2.6, 5.2, 27.7, 5.2, 27.7, 17.9, 2.6, 17.9]]}])]
    for name, h, w, anns in cases:
        canvas, image_id = np.zeros((h, w, 3), np.uint8), len(data["images"]) + 1
        for ann in anns:
            data["annotations"].append({"iscrowd": 0, **ann, "id": len(data["annotations"]) + 1, "image_id": image_id})
            seg = ann["segmentation"]
            if ann.get("iscrowd") or ann["bbox"][2] == 0:  # not a training target: not painted
                continue
            if isinstance(seg, list):  # fitted first: pycocotools crashes on a vertex past 2**31 / 5
                rle = mask_utils.merge(mask_utils.frPyObjects(fit_polygons(seg, w, h)[0], h, w))
            else:
                rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
            canvas[mask_utils.decode(rle).astype(bool)] = (255, 60 * LABEL[ann["category_id"]], 0)
        file_name = f"{name}.jpg" if name == "exif" else f"{name}.png"
        image = Image.fromarray(canvas)
        if name == "exif":
            _exif_turned(image, root / "img" / file_name)
        else:
            image = {"grey": image.getchannel(0), "palette": image.convert("P", palette=Image.ADAPTIVE, colors=8)}.get(
                name, image)
            image.save(root / "img" / file_name)
        data["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    (root / "instances.json").write_text(json.dumps(data))
    return read_coco(root / "instances.json", root / "img")


def _check_detection_sample(image, target, size: int) -> None:
    """A training sample as the detector takes it: boxes inside the image and each its mask's extent, masks not
    empty, labels in range, and each object on its painted pixels (red; green its label, where the image has colour)."""
    height, width = image.shape[-2:]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and 1 <= height <= size and 1 <= width <= size
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    boxes, labels, masks = target["boxes"], target["labels"], target["masks"].bool()
    assert boxes.shape == (len(labels), 4) and masks.shape == (len(labels), height, width)
    assert tuple(boxes.canvas_size) == (height, width) and boxes.dtype == torch.float32
    assert labels.dtype == torch.int64 and ((labels >= 1) & (labels <= len(LABEL))).all()
    assert masks.flatten(1).any(1).all()  # an instance the crop emptied is dropped
    for box, mask in zip(boxes.tolist(), masks):
        rows, cols = mask.any(-1).nonzero().flatten(), mask.any(-2).nonzero().flatten()
        assert box == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]  # also: x2 > x1, y2 > y1, inside the image
    # the masks are sampled at pixel centres, the image blended: over a pixel either side of an edge in a reduction,
    # to a product of two such blends at a corner in an enlargement (a quarter red), a thin line reduced to a third
    union = masks.any(0)[None, None].float()
    near, deep = F.max_pool2d(union, 3, 1, 1)[0, 0] > 0, -F.max_pool2d(-union, 3, 1, 1)[0, 0] > 0
    assert (image[0][deep] > 0.25).all() and (near[image[0] > 0.9]).all()
    if not torch.equal(image[0], image[1]):  # grey images hold no label colour
        for i, label in enumerate(labels.tolist()):
            alone = (masks[i] & (masks.sum(0) == 1))[None, None].float()  # a pixel in: not blended with another
            alone = (-F.max_pool2d(-alone, 3, 1, 1)[0, 0] > 0) & (image[0] > 0.97)
            if alone.sum() >= 20:
                assert abs(float(image[1][alone].median()) * 255 - 60 * label) <= 8


@pytest.mark.slow  # 300 samples: 15-45 s on a loaded 2-core host
def test_detection_training_samples_at_volume_keep_their_targets_on_their_objects(tmp_path):
    size = 128
    split = _coco(tmp_path)
    train = training_split(split)
    assert len(train.data["images"]) == len(split.data["images"]) - 2  # no annotation, crowd only
    data = detection_dataset(train, train_transforms(size), train=True, seed=0)
    model_input = FixedSizeTransform(size).train()
    empty = 0
    for epoch in range(16):
        batch = [data[(index, epoch)] for index in range(len(data))]
        assert not any(isinstance(item, Skipped) for item in batch)
        for image, target in batch:
            _check_detection_sample(image, target, size)
            empty += not len(target["labels"])
        images, targets = collate_detection_refill(batch)
        assert model_input(list(images), [dict(t) for t in targets])[0].tensors.shape == (len(batch), 3, size, size)
    assert 16 <= empty < 16 * len(data) // 2  # the image of an empty mask alone, and crops that miss every object


def test_detection_evaluation_inputs_are_each_image_as_read(tmp_path):
    split = _coco(tmp_path)
    data = detection_dataset(split, eval_transforms(), train=False)
    model_input = FixedSizeTransform(128).eval()
    for index, entry in enumerate(split.data["images"]):
        image, target = data[index]
        assert target == {"image_id": entry["id"]}
        assert image.shape == (3, entry["height"], entry["width"]) and image.dtype == torch.float32
        assert torch.allclose(image, load_image(tmp_path / "img" / entry["file_name"]).float() / 255, rtol=0, atol=1e-6)
        batch = model_input([image])[0].tensors
        assert batch.shape == (1, 3, 128, 128) and torch.isfinite(batch).all()


N = 5
LEVEL = {1: 45, 2: 85, 3: 125, 4: 165, 5: 205, 0: 245, 255: 245}  # a file's id -> its pixels' grey level


def _blocks(h, w, seed, block=None):
    block = block or max(1, min(h, w) // 4)
    grid = np.random.default_rng(seed).choice(list(LEVEL), size=(-(-h // block), -(-w // block)))
    return np.kron(grid, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def _ade(root):
    """An ADE20K-layout training split whose pixels are a function of the label (LEVEL)."""
    for folder in ("images", "annotations"):
        (root / folder / "training").mkdir(parents=True)
    sizes = {"normal": (64, 85), "wide": (40, 600), "tall": (600, 40), "small": (30, 40), "tiny": (5, 7),
             "one_pixel": (1, 1), "strip": (3, 200), "exif": (60, 45), "grey": (40, 70), "palette": (40, 70),
             "exact_crop": (64, 64)}
    pairs = {name: _blocks(*size, seed) for seed, (name, size) in enumerate(sizes.items())}
    pairs.update(all_zero=np.zeros((30, 40), np.uint8), all_255=np.full((30, 40), 255, np.uint8),
                 single_class=np.full((70, 50), 3, np.uint8), fine=_blocks(60, 80, 99, block=3))
    for name, ann in pairs.items():
        grey = Image.fromarray(np.vectorize(LEVEL.get)(ann).astype(np.uint8))
        image = {"grey": grey, "palette": grey.convert("P")}.get(name, grey.convert("RGB"))
        if name == "exif":
            _exif_turned(image, root / "images" / "training" / f"{name}.jpg")
        else:
            image.save(root / "images" / "training" / f"{name}.png")
        Image.fromarray(ann).save(root / "annotations" / "training" / f"{name}.png")


def _inside(labels, valid, k):
    """Pixels whose k x k neighbourhood holds their label alone, at least k // 2 from the crop's edges."""
    lab = labels.float()[None, None]

    def most(x):
        return F.max_pool2d(F.max_pool2d(x, (k, 1), 1, (k // 2, 0)), (1, k), 1, (0, k // 2))[0, 0]

    inner = torch.zeros_like(valid)
    inner[k // 2:-(k // 2) or None, k // 2:-(k // 2) or None] = True
    return (most(lab) == labels) & (-most(-lab) == labels) & valid & inner


@pytest.mark.slow  # 300 and 120 samples
@pytest.mark.parametrize("photometric", [True, False])
def test_segmentation_training_samples_at_volume_keep_labels_on_their_pixels(tmp_path, photometric):
    crop, epochs = 64, (20 if photometric else 8)
    _ade(tmp_path)
    data = SegmentationFolder(tmp_path, "training", N, crop=crop, seed=0, workers=1, photometric=photometric)
    sizes = [data.load(i)[0].shape[-2:] for i in range(len(data))]
    padded = 0
    for epoch in range(epochs):
        batch = [data[(index, epoch)] for index in range(len(data))]
        for index, (image, labels) in enumerate(batch):
            assert image.shape == (3, crop, crop) and labels.shape == (crop, crop) and labels.dtype == torch.int64
            assert torch.isfinite(image).all() and (((labels >= 0) & (labels < N)) | (labels == IGNORE)).all()
            # the rescaled size, from the sample's first draw (its ratio): beyond it, padding
            ratio = 0.5 + 1.5 * float(torch.rand((), generator=sample_generator(0, epoch, index)))
            scaled = [round(side * ratio) for side in eval_scale(*sizes[index], crop)]
            valid = torch.zeros(crop, crop, dtype=torch.bool)
            valid[:min(max(1, scaled[0]), crop), :min(max(1, scaled[1]), crop)] = True
            assert (labels[~valid] == IGNORE).all() and (image[:, ~valid] == 0).all()
            padded += not valid.all()
            pixels = image * STD + MEAN
            assert (pixels[:, valid].amax(0) - pixels[:, valid].amin(0)).max() <= 1  # grey stays grey
            if data.images[index].stem == "fine":  # 3 px blocks: no pixel far enough from another label
                continue
            # bilinear blends over the upscale factor's pixels; ADE's files hold both 0 and 255 as IGNORE
            k = 2 * int(np.ceil(max(1.0, max(s / f for s, f in zip(scaled, sizes[index]))))) + 5
            inner, grey = _inside(labels, valid, min(k, 2 * crop + 1)), pixels.mean(0)
            spans = [(grey[inner & (labels == v)], LEVEL[v + 1 if v < N else 0]) for v in [*range(N), IGNORE]]
            spans = [(got, want) for got, want in spans if len(got)]
            if not photometric:
                tolerance = 4.5 if data.images[index].suffix == ".jpg" else 1
                assert all((got - want).abs().max() <= tolerance for got, want in spans)
            else:  # brightness and contrast keep the levels' order; saturation and hue leave grey as it is
                for (low, _), (high, _) in zip(spans, spans[1:]):
                    assert low.max() <= high.min() + 1
        images, labels = collate_segmentation(batch)
        assert images.shape == (len(data), 3, crop, crop) and labels.shape == (len(data), crop, crop)
    assert padded > epochs  # images smaller than the crop are padded, at least once per epoch


def test_segmentation_evaluation_inputs_at_every_size(tmp_path):
    _ade(tmp_path)
    data = SegmentationFolder(tmp_path, "training", N, crop=64, train=False, workers=1)
    for index in range(len(data)):
        image, labels, stem = data[index]
        height, width = data.load(index)[0].shape[-2:]
        assert image.shape == (3, *eval_scale(height, width, 64)) and labels.shape == (height, width)
        assert torch.isfinite(image).all() and (((labels >= 0) & (labels < N)) | (labels == IGNORE)).all()
