"""`lomar detect`: the COCO reader's checks and cleaning, the jitter, the detector's parts, and an
end-to-end run whose predictions.json pycocotools re-scores to the AP lomar reported."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from coco_tiny import write_tiny_coco
from PIL import Image
from torchvision.models.detection.image_list import ImageList

from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.coco import (
    collate_detection,
    detection_dataset,
    read_coco,
    training_split,
)
from lomar.data.collate import Skipped
from lomar.data.jitter import eval_transforms, train_transforms
from lomar.errors import UsageError
from lomar.integrations.detection import detector_param_groups
from lomar.models.mask_rcnn import FixedSizeTransform, ViTMaskRCNN
from lomar.models.vit import VisionTransformer, model_config
from lomar.train.detect import DetectTask, step_lr_factor
from lomar.train.task import TrainingError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return write_tiny_coco(root / "train", 6, seed=0), write_tiny_coco(root / "val", 3, seed=1)


@pytest.fixture(scope="module")
def one_val(tmp_path_factory):
    """A validation split of one image: for runs whose evaluations are not what the test checks (a randomly
    initialised detector's mask head runs on 100 boxes an image)."""
    return write_tiny_coco(tmp_path_factory.mktemp("coco") / "val", 1, seed=1)


def _edit(ann, tmp_path, change) -> str:
    data = json.loads(ann.read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data) if isinstance(data, dict) else data)
    return str(path)


def _set(key, value):
    def change(data):
        data[key] = value
    return change


BAD = {  # how the file is broken -> what its one line must say
    "missing key": (lambda d: d.pop("categories"), "no 'categories' key"),
    "image without size": (lambda d: d["images"][0].pop("width"), "images[0] has no 'width'"),
    "duplicate image ids": (lambda d: d["images"][1].update(id=1), "image id 1 appears 2 times"),
    "duplicate annotation ids": (lambda d: d["annotations"][1].update(id=1), "annotation id 1 appears 2 times"),
    "duplicate category ids": (lambda d: d["categories"][1].update(id=3), "category id 3 appears 2 times"),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=99),
                         "category_id 99, which is not in categories"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=999), "image_id 999, which is not in images"),
    "annotation without segmentation": (lambda d: d["annotations"][0].pop("segmentation"), "has no 'segmentation'"),
    "malformed bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "four finite numbers"),
    "no polygon": (lambda d: d["annotations"][0].update(segmentation=[]), "an empty polygon list"),
    "short polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), "at least 3 x, y pairs"),
    "flat polygon": (lambda d: d["annotations"][0].update(segmentation=[1, 2, 3, 4, 5, 6]), "at least 3 x, y pairs"),
    "RLE of another size": (lambda d: d["annotations"][0].update(segmentation={"size": [5, 5], "counts": "0"}),
                            "an RLE of size [5, 5], but its image is 96x128"),
    "string image id": (lambda d: [a.update(image_id="a") for a in d["annotations"] if a["image_id"] == 1]
                        and d["images"][0].update(id="a"), "image id 'a' is not an integer"),
    "image listed but missing": (lambda d: d["images"][0].update(file_name="gone.png"),
                                 "not found under"),
    "list image id": (lambda d: d["annotations"][0].update(image_id=[1]), "has image_id [1], not an integer id"),
    "list category id": (lambda d: d["annotations"][0].update(category_id=[3]),
                         "has category_id [3], not an integer id"),
    "empty string id": (lambda d: d["annotations"][1].update(id=""), "annotation id '' is not an integer"),
    "string area": (lambda d: d["annotations"][0].update(area="abc"), "has area 'abc'; an area is a finite number"),
    "infinite width": (lambda d: d["images"][0].update(width=math.inf), "has width inf, height 96"),
    "text width": (lambda d: d["images"][0].update(width="128"), "has width '128', height 96; both must be positive "
                                                                  "numbers (pixels, not text)"),
    "string iscrowd": (lambda d: d["annotations"][0].update(iscrowd="0"), "has iscrowd '0'; it is 0 or 1"),
    "string iscrowd of an empty box": (lambda d: d["annotations"][0].update(bbox=[9, 9, 0, 4], iscrowd="0"),
                                       "has iscrowd '0'; it is 0 or 1"),  # COCOeval scores that box too
    "RLE runs short of its mask": (lambda d: d["annotations"][0].update(segmentation={"size": [96, 128],
                                                                                      "counts": [5, 3]}),
                                   "counts totalling 8 pixels, where its 96x128 mask needs runs totalling 12288"),
    "RLE with a negative run": (lambda d: d["annotations"][0].update(segmentation={"size": [96, 128],
                                                                                   "counts": [-5, 12293]}),
                                "an RLE with malformed counts"),
    "RLE string out of the alphabet": (lambda d: d["annotations"][0].update(segmentation={"size": [96, 128],
                                                                                          "counts": "!!!garbage"}),
                                       "an RLE with malformed counts"),
    "nothing to score": (lambda d: d.update(annotations=[a | {"iscrowd": 1} for a in d["annotations"]]),
                         "no annotation to score (each is a crowd region or of zero area)"),
    "empty split": (_set("images", []), "lists no images"),
    "no categories": (_set("categories", []), "lists no categories"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_coco_file_is_one_line_naming_it(case, tiny, tmp_path, capsys):
    change, expected = BAD[case]
    (_, train_images), (val_ann, val_images) = tiny
    bad = _edit(val_ann, tmp_path, change)
    code = main(["detect", "--train-ann", bad, "--train-images", str(train_images), "--val-ann", bad,
                 "--val-images", str(val_images), "--model", "vit_tiny_patch16", "--img-size", "64",
                 "--max-steps", "1", "--rois-per-image", "16", "--workers", "0",  # a file let through fails fast
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"lomar detect: error: {bad}: ") and expected in err and "\n" not in err, err


def test_valid_rles_pass_the_run_length_check():
    """pycocotools' own encodings, compressed and not, total their masks' pixels (the check reads the string as
    pycocotools reads it: sign-extended, runs after the second as differences)."""
    from pycocotools import mask as coco_mask

    from lomar.data.coco_values import segmentation_error

    rng = torch.Generator().manual_seed(0)
    for height, width, density in ((96, 128, 0.5), (7, 5, 0.1), (40, 33, 0.9), (3, 3, 0.0), (2, 4, 1.0)):
        mask = (torch.rand(height, width, generator=rng) < density).numpy().astype("uint8")
        encoded = coco_mask.encode(mask.copy(order="F"))
        rle = {"size": [height, width], "counts": encoded["counts"].decode()}
        assert segmentation_error(rle, width, height) is None, rle
        flat = mask.flatten(order="F")  # uncompressed counts: runs of 0, 1, 0, ... in column-major order
        runs = [0] * int(flat[0]) + [len(list(run)) for _, run in itertools.groupby(flat)]
        assert sum(runs) == height * width
        assert segmentation_error({"size": [height, width], "counts": runs}, width, height) is None
        assert (coco_mask.decode(coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width))
                == mask).all()


@pytest.mark.parametrize("args, expected", [
    (["--img-size", "100"], "--img-size must be a multiple of 32"),
    (["--jitter", "2", "1"], "--jitter must be LOW HIGH"),
    (["--val-images", "/no/such/folder"], "--val-images /no/such/folder is not a folder"),
    (["--global-blocks", "1", "--window-size", "0"], "--global-blocks needs --window-size"),
    (["--eval-only"], "--eval-only needs --pretrained"),
    (["--model", "vit_tiny_patch14"], "--model vit_tiny_patch14: the feature pyramid needs patch size 16"),
])
def test_bad_settings_are_one_line(args, expected, tiny, tmp_path, capsys):
    (train_ann, train_images), (val_ann, val_images) = tiny
    base = ["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann", str(val_ann),
            "--val-images", str(val_images), "--model", "vit_tiny_patch16", "--img-size", "64",
            "--out", str(tmp_path / "run")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err, err


def test_a_relative_position_term_on_a_lomar_encoder_is_one_line_and_makes_no_folder(tiny, tmp_path, capsys):
    (train_ann, train_images), (val_ann, val_images) = tiny
    out = tmp_path / "run"
    assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                 str(val_ann), "--val-images", str(val_images), "--model", "vit_tiny_patch16", "--img-size", "64",
                 "--rel-pos", "decomposed", "--device", "cpu", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("lomar detect: error: --rel-pos decomposed: --rel-pos 'decomposed' is for encoders without iRPE "
                    "(MAE's); a LoMaR encoder has its own relative position: use auto or none")
    assert not out.exists()


def test_an_encoder_the_pyramid_cannot_use_is_refused_from_its_shapes_before_the_coco_files(tiny, tmp_path, capsys):
    """A patch-8 --pretrained was refused only after the validation file's parse, its images' check and the whole
    checkpoint's read (a broken --val-ann here: the COCO error came first); the stem's mapped shape or config.json
    tells it."""
    from lomar import LoMaR, export_encoder
    from lomar.checkpoints.convert import pretrain_checkpoint
    from lomar.checkpoints.io import atomic_save

    (train_ann, train_images), _ = tiny
    model = LoMaR(model_config("vit_mini_patch8", img_size=32), window_size=2, num_windows=1)
    atomic_save(pretrain_checkpoint(model), tmp_path / "p8.pt")
    export_encoder(model.encoder, tmp_path / "p8")
    broken = tmp_path / "val.json"
    broken.write_text("{")
    for source in (tmp_path / "p8.pt", tmp_path / "p8"):
        out = tmp_path / f"run-{source.name}"
        assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                     str(broken), "--val-images", str(train_images), "--pretrained", str(source), "--img-size", "64",
                     "--device", "cpu", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"lomar detect: error: --pretrained {source}: the feature pyramid needs patch size 16 (strides 4-32), its "
            f"encoder's is 8; pass a patch-16 encoder")
        assert not out.exists()


def test_a_validation_folder_of_other_images_is_refused_before_training(tiny, tmp_path, capsys):
    # --val-images at half-size copies: each was skipped at the first evaluation, after an epoch of training, and
    # the run went on unscored ("no metric defined"), exit 0
    (train_ann, train_images), (val_ann, val_images) = tiny
    (small := tmp_path / "small").mkdir()
    for path in sorted(val_images.iterdir()):
        with Image.open(path) as image:
            image.resize((image.width // 2, image.height // 2)).save(small / path.name)
    out = tmp_path / "run"
    assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                 str(val_ann), "--val-images", str(small), "--model", "vit_tiny_patch16", "--img-size", "64",
                 "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "1", "--rois-per-image", "16",
                 "--workers", "0", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lomar detect: error: 3 of the 3 images {val_ann} lists (over 10%) cannot be used, e.g. "
                           f"{small / 'img000.png'} is 64x48 upright, but {val_ann} gives it 128x96")
    assert last.endswith("pass the folder of the images it was written for as --val-images, or fix the file")
    assert not out.exists()


def test_boxes_clipped_zero_area_skipped_crowd_kept_for_evaluation_only(tiny, tmp_path):
    (ann, images), _ = tiny
    data = json.loads(ann.read_text())
    anns = data["annotations"]
    anns[0]["bbox"] = [-10.0, -5.0, 40.0, 30.0]  # reaches outside: clipped to [0, 0, 30, 25]
    anns[1]["bbox"] = [20.0, 20.0, 0.0, 10.0]  # no area: skipped
    anns[2]["iscrowd"] = 1
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    split = read_coco(path, images)
    s = split.summary
    assert (s.clipped, s.zero_area, s.crowd, s.boxes) == (1, 1, 1, len(anns) - 2)
    assert split.data["annotations"][0]["bbox"] == [0.0, 0.0, 30.0, 25.0]
    assert any(a["iscrowd"] for a in split.data["annotations"])  # pycocotools ignores detections on it
    train = training_split(split)
    assert not any(a["iscrowd"] for a in train.data["annotations"])
    assert all(a["id"] != anns[1]["id"] for a in train.data["annotations"])
    everything_crowd = {**split.data, "annotations": [{**a, "iscrowd": 1} for a in split.data["annotations"]]}
    with pytest.raises(UsageError, match="no image with a usable box"):
        training_split(type(split)(split.path, split.root, everything_crowd, split.categories))


def test_training_says_the_images_without_a_box_it_leaves_out(tiny, tmp_path):
    """An image of no annotation (or only crowd ones) is not trained on: the train line's count says so, where the
    run's image count fell short of the file's without a word."""
    (ann, images), _ = tiny
    data = json.loads(ann.read_text())
    last = data["images"][-1]["id"]
    data["annotations"] = [a if a["image_id"] != last else {**a, "iscrowd": 1} for a in data["annotations"]]
    path = tmp_path / "one_crowded.json"
    path.write_text(json.dumps(data))
    split = read_coco(path, images)
    train = training_split(split)
    assert len(train.data["images"]) == len(data["images"]) - 1 and train.summary.boxless == 1
    assert train.summary.line().endswith(", 1 images without a box left out of training")
    assert split.summary.boxless == 0 and "without a box" not in split.summary.line()  # the file as read: all kept


def test_jitter_keeps_boxes_masks_and_labels_together(tiny):
    (ann, images), _ = tiny
    split = training_split(read_coco(ann, images))
    dataset = detection_dataset(split, train_transforms(64, (0.5, 2.0)), train=True, seed=0)
    cropped = 0
    for epoch in range(4):
        for i in range(len(dataset)):
            image, target = dataset[i, epoch]
            assert image.dtype == torch.float32 and max(image.shape[-2:]) <= 64 and image.max() <= 1
            n = len(target["boxes"])
            assert target["masks"].shape == (n, *image.shape[-2:]) and target["labels"].shape == (n,)
            assert set(target["labels"].tolist()) <= {1, 2}  # category ids 3, 7 -> labels 1, 2
            cropped += n < sum(a["image_id"] == split.data["images"][i]["id"] for a in split.data["annotations"])
            for box, mask in zip(target["boxes"], target["masks"]):  # ViTDet: each box is its mask's extent
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert cropped  # some crops cut objects away: what the recomputed boxes are for


def test_training_samples_are_a_function_of_seed_epoch_and_index(tiny):
    (ann, images), _ = tiny
    split = training_split(read_coco(ann, images))
    dataset = detection_dataset(split, train_transforms(64, (0.5, 2.0)), train=True, seed=3)
    torch.manual_seed(0)
    first = dataset[2, 1]
    state = torch.get_rng_state()
    torch.manual_seed(123)  # the caller's stream does not matter, and is left as it was
    again = dataset[2, 1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    torch.manual_seed(0)
    dataset[2, 1]
    assert torch.equal(torch.get_rng_state(), state)
    other = [dataset[2, epoch][0] for epoch in range(2, 6)]
    assert any(image.shape != first[0].shape or not torch.equal(image, first[0]) for image in other)


def test_unusable_images_are_skipped_with_a_warning(tiny, tmp_path, caplog):
    (ann, images), _ = tiny
    data = json.loads(ann.read_text())
    folder = tmp_path / "images"
    folder.mkdir()
    for image in data["images"]:
        (folder / image["file_name"]).write_bytes((images / image["file_name"]).read_bytes())
    truncated = folder / data["images"][0]["file_name"]
    truncated.write_bytes(truncated.read_bytes()[:200])
    data["images"][1]["width"] = 100  # not the file's size: its boxes would not fit
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    split = training_split(read_coco(edited, folder))
    dataset = detection_dataset(split, train_transforms(64), train=True, seed=0)
    with caplog.at_level("WARNING", logger="lomar.data"):
        batch = [dataset[i, 0] for i in range(3)]
    assert isinstance(batch[0], Skipped) and isinstance(batch[1], Skipped) and not isinstance(batch[2], Skipped)
    assert str(truncated) in batch[0] and "is 128x96 upright, but" in batch[1]
    assert str(truncated) in caplog.text and "is 128x96 upright, but" in caplog.text
    images_out, targets = refilled = collate_detection(batch, refill=True)
    assert len(images_out) == 3 and all(image is images_out[0] for image in images_out)
    assert refilled.bad == batch[:2]  # the run counts them (lomar.train.skipped_files.SkippedFiles)
    assert collate_detection(batch) == ([batch[2][0]], [batch[2][1]])


def test_too_many_unusable_training_images_stop_the_run_in_one_line(tiny, tmp_path, capsys):
    (train_ann, train_images), (val_ann, val_images) = tiny
    folder = tmp_path / "images"
    shutil.copytree(train_images, folder)
    truncated = sorted(folder.glob("*.png"))[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    code = main(["detect", "--train-ann", str(train_ann), "--train-images", str(folder), "--val-ann", str(val_ann),
                 "--val-images", str(val_images), "--model", "vit_tiny_patch16", "--img-size", "64",
                 "--batch-size", "2", "--max-steps", "3", "--rois-per-image", "16", "--workers", "0",
                 "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert (f"1 image could not be used so far, over 10% of the 6 an epoch reads (3 batch(es) of 2 per process), e.g. "
            f"cannot decode image {truncated}") in err


def test_exif_rotated_image_is_read_upright(tiny, tmp_path):
    from PIL import Image

    (ann, images), _ = tiny
    data = json.loads(ann.read_text())
    first = data["images"][0]
    stored = Image.open(images / first["file_name"]).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show: the stored image turned back upright
    folder = tmp_path / "images"
    folder.mkdir()
    for image in data["images"]:
        (folder / image["file_name"]).write_bytes((images / image["file_name"]).read_bytes())
    first["file_name"] = "rotated.jpg"
    stored.save(folder / "rotated.jpg", exif=exif, quality=95)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    image, _ = detection_dataset(read_coco(edited, folder), eval_transforms(), train=False)[0]
    assert image.shape == (3, first["height"], first["width"])


def test_evaluation_does_not_change_the_split_it_scores(tiny):
    (ann, images), _ = tiny
    split = read_coco(ann, images)
    before = json.dumps(split.data)
    coco = split.coco()
    coco.dataset["annotations"][0]["segmentation"] = {"size": [1, 1], "counts": "1"}  # as COCOeval's toRle does
    assert json.dumps(split.data) == before


def test_detector_pads_to_a_fixed_size_and_groups_every_parameter_once():
    encoder = VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=4, window_size=2,
                                             global_blocks=(1, 3)))
    with pytest.raises(ValueError, match="multiple of 32"):
        ViTMaskRCNN(encoder, 2, 80)
    model = ViTMaskRCNN(encoder, 2, 64)
    features = model.backbone(torch.zeros(1, 3, 64, 64))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "p2": (16, 16), "p3": (8, 8), "p4": (4, 4), "p5": (2, 2), "p6": (1, 1)}
    batch = FixedSizeTransform(64).batch_images([torch.ones(3, 40, 64), torch.ones(3, 64, 20)])
    assert batch.shape == (2, 3, 64, 64)
    assert batch[0, :, :40].eq(1).all() and batch[0, :, 40:].eq(0).all() and batch[1, :, :, 20:].eq(0).all()
    groups = detector_param_groups(model, 0.1, 0.7)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    # detectron2's get_vit_lr_decay_rate: 0.7^(depth + 1 - layer), stem layer 0, block i layer i + 1
    assert scale_of[id(encoder.patch_embed.proj.weight)] == pytest.approx(0.7 ** 5)
    assert scale_of[id(encoder.blocks[0].attn.qkv.weight)] == pytest.approx(0.7 ** 4)
    assert scale_of[id(encoder.blocks[3].attn.qkv.bias)] == pytest.approx(0.7)
    assert scale_of[id(model.roi_heads.box_predictor.cls_score.weight)] == 1.0
    assert decay_of[id(encoder.blocks[0].norm1.weight)] == decay_of[id(encoder.cls_token)] == 0.0
    assert decay_of[id(encoder.blocks[0].attn.qkv.weight)] == decay_of[id(encoder.blocks[0].attn.qkv.bias)] == 0.1


def test_roi_scales_follow_the_pyramid_not_the_first_batchs_image_sizes():
    # torchvision infers them from the first batch's largest unpadded image: a 20x26 one, padded to 64,
    # would fix p2 at 1/2 instead of 1/4 for the rest of the run
    torch.manual_seed(0)
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=2)), 2, 64)
    target = {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 20, 26, dtype=torch.uint8)}
    model.train()([torch.rand(3, 20, 26)], [target])
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        assert (pool.map_levels.k_min, pool.map_levels.k_max) == (2, 5)


@pytest.mark.parametrize("size, p6_grid", [(96, 2), (800, 13)])
def test_anchors_lie_at_the_pyramids_strides(size, p6_grid):
    # torchvision took a level's stride as input // grid: p6's (p5 subsampled by 2) at an odd multiple of 32 was
    # 48 at 96 px, 61 at 800, while its cells lie 64 px apart
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=32, depth=1)), 2, size)
    grids = [(size // stride,) * 2 for stride in (4, 8, 16, 32)] + [(p6_grid,) * 2]
    features = [torch.zeros(1, 1, *grid) for grid in grids]
    images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    (anchors,) = model.rpn.anchor_generator(images, features)
    levels = anchors.split([3 * h * w for h, w in grids])
    for (h, w), stride, level in zip(grids, (4, 8, 16, 32, 64), levels):
        centres = ((level[:, :2] + level[:, 2:]) / 2).unique(dim=0)
        assert [sorted(set(centres[:, k].tolist())) for k in (1, 0)] == [[stride * i for i in range(n)]
                                                                         for n in (h, w)], stride


def test_rois_keep_fp32_coordinates_under_bf16_autocast():
    # torchvision's BoxCoder cast anchors and proposals to the bf16 deltas (a GPU's default precision): the ground
    # truth box joined the RoIs with x1 100.5 for 100.3, and above 512 px every RoI lay on a 4 px grid
    torch.manual_seed(0)
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=128, depth=1)), 2, 128)
    gt = torch.tensor([[100.3, 60.7, 120.1, 90.2]])
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 61:90, 100:120] = 1
    rois, add = [], model.roi_heads.add_gt_proposals

    def sampled(proposals, boxes):  # the RoIs the heads would train on; the heads themselves are not needed
        rois.extend(add(proposals, boxes))
        raise StopIteration

    model.roi_heads.add_gt_proposals = sampled
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(StopIteration):
        model.train()([torch.rand(3, 128, 128)], [{"boxes": gt, "labels": torch.tensor([1]), "masks": masks}])
    assert rois[0].dtype == torch.float32 and torch.equal(rois[0][-1:], gt)


def test_anchors_keep_fp32_coordinates_under_bf16_autocast():
    # the anchors took the pyramid's dtype, bf16 under autocast (a GPU's default precision): from 256 px on they lay on
    # a grid of 2 px (4 px from 512), so each RPN target and proposal was measured from a shifted box
    class Anchored(Exception):
        """Raised once the anchors are made: the proposals and heads after them (seconds at 512 px, bf16 on the CPU)
        are not what this test checks."""

    def made(module, args, out):
        anchors.append((args[1][0].dtype, out[0]))
        raise Anchored

    torch.manual_seed(0)
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=1)), 2, 512).eval()
    anchors = []
    model.rpn.anchor_generator.register_forward_hook(made)
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad(), pytest.raises(Anchored):
        model(image)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(Anchored):
        model(image)
    (fp32_maps, exact), (bf16_maps, autocast) = anchors
    assert (fp32_maps, bf16_maps) == (torch.float32, torch.bfloat16)  # the pyramid's maps are bf16 under autocast
    assert autocast.dtype == torch.float32 and torch.equal(autocast, exact)


def test_a_detector_checkpoint_is_known_by_its_content_not_its_suffix(tmp_path):
    # a detector saved or renamed as .pth was "not a `lomar detect` run or checkpoint" to --eval-only, and an encoder
    # to be loaded otherwise
    from lomar.checkpoints.io import atomic_save
    from lomar.checkpoints.kinds import DETECT_FORMAT, find_command_checkpoint

    def detect_checkpoint(path):
        found = find_command_checkpoint(path, "detect")
        return found.path if found is not None else None

    for name in ("model_final.pth", "detector.ckpt", "last.pt"):
        atomic_save({"format": DETECT_FORMAT, "model": {}}, tmp_path / name)
        assert detect_checkpoint(tmp_path / name) == tmp_path / name
    atomic_save({"model": {}}, tmp_path / "encoder.pth")
    (tmp_path / "notes.json").write_text("{}")
    assert detect_checkpoint(tmp_path / "encoder.pth") is None and detect_checkpoint(tmp_path / "notes.json") is None
    assert detect_checkpoint(tmp_path) == tmp_path / "last.pt"  # a run folder: best.pt, else last.pt


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]])
def test_a_new_run_from_a_detector_takes_its_layout_even_with_resume_auto(tmp_path, capsys, resume):
    # --resume auto in a job script that always passes it: with no checkpoint in --out the run is new, and it trained
    # at the defaults' layout (1024 px, 14-patch windows) instead of the detector's
    from lomar.checkpoints.io import atomic_save
    from lomar.checkpoints.kinds import DETECT_FORMAT

    atomic_save({"format": DETECT_FORMAT, "model": {}, "settings": {"img_size": 256, "window_size": 7}},
                detector := tmp_path / "det.pt")
    (ann := tmp_path / "ann.json").write_text('{"images": [], "annotations": [], "categories": []}')
    assert main(["detect", "--pretrained", str(detector), "--train-ann", str(ann), "--val-ann", str(ann),
                 "--out", str(tmp_path / "run"), *resume, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["img_size"], printed["window_size"]) == (256, 7) and "detector" not in printed


def test_step_schedule_is_vitdets():
    assert step_lr_factor(0, 1000, 250) == pytest.approx(0.001)
    assert step_lr_factor(250, 1000, 250) == 1.0
    assert step_lr_factor(888, 1000, 250) == 1.0 and step_lr_factor(889, 1000, 250) == pytest.approx(0.1)
    assert step_lr_factor(963, 1000, 250) == pytest.approx(0.01)
    # ViTDet's 100-epoch milestones: steps 163,889 and 177,546 of 184,375 (0.889 and 0.963 put them 20 and 7 later)
    assert step_lr_factor(163888, 184375, 250) == 1.0 and step_lr_factor(163889, 184375, 250) == pytest.approx(0.1)
    assert step_lr_factor(177545, 184375, 250) == pytest.approx(0.1)
    assert step_lr_factor(177546, 184375, 250) == pytest.approx(0.01)


def test_a_run_past_its_schedules_end_is_told_the_lr_detect_trains_at_there():
    """Detect's step schedule ends at 0.01 x the peak lr, not at min_lr as a cosine does: the refusal names it."""
    from lomar.train.schedule import schedule_overrun

    lr_schedule = DetectTask.lr_schedule_of(None)  # told unbuilt, as a resume's refusal reads it
    assert lr_schedule is DetectTask.__new__(DetectTask).lr_schedule
    message = schedule_overrun(8, 3.0, 1.0, 1e-4, 0.0, lr_schedule)
    assert ("steps 4-8 would all train at lr 1e-06 (0.01 x the peak lr 0.0001, where its schedule ends); end it at "
            "--max-steps 3, or raise --schedule-steps to 8") in message
    assert "would all train at min_lr 0;" in schedule_overrun(8, 3.0, 1.0, 1e-4, 0.0)  # a cosine's end


def _rescore(ann_file, predictions: list[dict]) -> dict[str, float | None]:
    """pycocotools alone, as detectron2 scores: boxes from bbox, masks with bbox dropped."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        for prefix, kind, drop in (("box", "bbox", "segmentation"), ("mask", "segm", "bbox")):
            evaluator = COCOeval(gt, gt.loadRes([{k: v for k, v in p.items() if k != drop} for p in predictions]), kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            out.update({f"{prefix}_{n}": (v * 100 if v >= 0 else None) for n, v in zip(names, evaluator.stats)})
    return out


@pytest.mark.slow
def test_detect_trains_and_predictions_rescore_to_the_reported_ap(tiny, tmp_path, capsys, monkeypatch):
    (train_ann, train_images), (val_ann, val_images) = tiny
    out = tmp_path / "run"
    data = ["--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann", str(val_ann),
            "--val-images", str(val_images)]
    code = main(["detect", *data, "--model", "vit_tiny_patch16", "--img-size", "96", "--batch-size", "2",
                 "--max-steps", "2", "--warmup-steps", "1", "--rois-per-image", "32",
                 "--workers", "0", "--threads", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "randomly initialised" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # Mask R-CNN's five losses, each logged, and the loss their sum
        parts = [r[name] for name in DetectTask.loss_parts]
        assert len(parts) == 5 and all(math.isfinite(v) and v >= 0 for v in parts), r
        assert math.isclose(sum(parts), r["loss"], rel_tol=1e-5), r
    scored = [r for r in records if "box_AP" in r]
    assert scored and scored[-1]["step"] == 2
    metrics = scored[-1]
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(predictions[0])
    assert {p["category_id"] for p in predictions} <= {3, 7}
    rescored = _rescore(val_ann, predictions)
    for key, value in rescored.items():
        assert (metrics[key] is None) == (value is None), key
        assert value is None or math.isclose(metrics[key], value, abs_tol=1e-9), (key, metrics[key], value)

    # --eval-only on the finished run scores the same detector the same way
    (out / "predictions.json").rename(tmp_path / "first.json")
    evaluated = tmp_path / "evaluated"
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or load(f, *a, **k))
    code = main(["detect", "--val-ann", str(val_ann), "--val-images", str(val_images), "--eval-only",
                 "--pretrained", str(out / "last.pt"), "--workers", "0", "--out", str(evaluated)])
    assert code == 0
    assert reads == [out / "last.pt"]  # read once: the settings taken and the weights scored are of one read
    monkeypatch.undo()
    assert "96 px input" in capsys.readouterr().err  # the detector's own size, not the 1024 default
    again = json.loads((evaluated / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: again[k] for k in rescored} == {k: metrics[k] for k in rescored} and again["img_size"] == 96
    # which file of the run was scored, and at which step (a run folder gives its best.pt, else last.pt)
    assert again["checkpoint"] == str(out / "last.pt") and again["step"] == 2
    # the predictions written are not replaced by another scoring unless asked to
    code = main(["detect", "--val-ann", str(val_ann), "--val-images", str(val_images), "--eval-only",
                 "--pretrained", str(out / "last.pt"), "--workers", "0", "--out", str(evaluated)])
    assert code == 2 and "already holds a predictions.json" in capsys.readouterr().err


@pytest.mark.slow
def test_clip_grad_clips_the_gradient(tiny, one_val, tmp_path):
    # a diverging detection run could only be told to lower --blr: it had no --clip-grad
    from helpers import applied_grad_norms

    (train_ann, train_images), (val_ann, val_images) = tiny[0], one_val
    out = tmp_path / "run"
    norms = applied_grad_norms(lambda: main([
        "detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann", str(val_ann),
        "--val-images", str(val_images), "--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "2",
        "--max-steps", "1", "--warmup-steps", "1", "--rois-per-image", "16", "--eval-every", "50", "--workers", "0",
        "--threads", "2", "--clip-grad", "0.001", "--out", str(out)]))
    assert norms == pytest.approx([0.001], rel=1e-3)


@pytest.mark.longest
def test_detect_resume_is_exact(tiny, one_val, tmp_path, capsys):
    """4 steps straight == 2 steps, then --resume auto to 4: same weights, same logged losses."""
    (train_ann, train_images), _ = tiny
    val_ann, val_images = one_val  # each run still evaluates, at the epoch's end and at its own
    common = ["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann", str(val_ann),
              "--val-images", str(val_images), "--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "2",
              "--schedule-steps", "4", "--warmup-steps", "1", "--rois-per-image", "16",
              "--workers", "2", "--threads", "1", "--device", "cpu", "--log-every", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    # --no-train-pos-embed is unused by this encoder (iRPE, no absolute table): said, and the weights the same
    assert main([*common, "--max-steps", "4", "--out", str(straight), "--no-train-pos-embed"]) == 0
    assert ("lomar detect: note: --no-train-pos-embed is unused: it acts on an absolute position table (MAE's), and "
            "this encoder has none\n") in capsys.readouterr().err
    assert main([*common, "--max-steps", "2", "--out", str(split)]) == 0, capsys.readouterr().err
    assert main(["detect", "--out", str(split), "--resume", "auto", "--max-steps", "4"]) == 0, capsys.readouterr().err
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for run in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.slow
def test_an_mae_tables_training_follows_train_pos_embed(tiny, one_val, image_dir, tmp_path, capsys):
    from helpers import pretrain

    pre = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(pre), "--method", "mae", "--windows", "0",
                    "--model", "vit_tiny_patch16", "--img-size", "64", "--max-steps", "1",
                    "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2") == 0
    (train_ann, train_images), (val_ann, val_images) = tiny[0], one_val
    counts = {}
    for trained in (True, False):
        out = tmp_path / f"det-{trained}"
        assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                     str(val_ann), "--val-images", str(val_images), "--pretrained", str(pre / "last.pt"),
                     "--img-size", "64", "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "0",
                     "--rois-per-image", "16", "--workers", "0", "--threads", "1", "--device", "cpu",
                     "--out", str(out), *([] if trained else ["--no-train-pos-embed"])]) == 0, capsys.readouterr().err
        assert "lomar detect: relative position term: decomposed, added to every block from zero" in \
            capsys.readouterr().err  # the load line before it says 'newly initialised: none' of the encoder's own
        counts[trained] = sum(len(g["params"]) for g in safe_load(out / "last.pt")["optimizer"]["param_groups"])
    assert counts[True] == counts[False] + 1
    # ViTDet's decomposed term in every block, from zero: window tables span 14 (capped by the 4x4 grid), trained
    detector = safe_load(out / "last.pt")
    assert detector["settings"]["rel_pos"] == "decomposed" and detector["encoder_config"]["rel_pos"] == "decomposed"
    tables = {k: v for k, v in detector["model"].items() if k.endswith((".attn.rel_pos_h", ".attn.rel_pos_w"))}
    assert len(tables) == 2 * detector["encoder_config"]["depth"]
    assert {v.shape[0] for v in tables.values()} == {7} and all(v.abs().sum() > 0 for v in tables.values())
    # scored at another size: the per-axis tables are resampled to the 6x6 grid; another term is refused
    evaluate = ["detect", "--val-ann", str(val_ann), "--val-images", str(val_images), "--eval-only", "--pretrained",
                str(out / "last.pt"), "--workers", "0", "--threads", "1", "--device", "cpu"]
    assert main([*evaluate, "--img-size", "96", "--out", str(tmp_path / "at96")]) == 0, capsys.readouterr().err
    assert "96 px input" in capsys.readouterr().err
    assert main([*evaluate, "--rel-pos", "bias", "--out", str(tmp_path / "bias")]) == 2
    assert "--rel-pos bias differs from the detector's own (decomposed)" in capsys.readouterr().err
    # a validation batch whose images are all unreadable is skipped, not fed to the model as an empty list (a
    # traceback): a JPEG cut short passes the up-front check (its header is whole; a PNG's check decodes it) and fails
    # in the loader; with no image of the split read, the evaluation stops in one line (exit 1: no score to give)
    data = json.loads(val_ann.read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for image in data["images"]:
        jpeg = broken / image["file_name"].replace(".png", ".jpg")
        Image.open(val_images / image["file_name"]).save(jpeg, quality=95)
        jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
        image["file_name"] = jpeg.name
    (broken / "instances.json").write_text(json.dumps(data))
    scored = ["--val-ann", str(broken / "instances.json"), "--val-images", str(broken),
              "--out", str(tmp_path / "broken-eval")]
    assert main([*evaluate[:1], *evaluate[5:], *scored]) == 1
    assert f"error: no image in {broken} could be read (1 tried); fix or replace them" in capsys.readouterr().err


def test_evaluation_shrinks_a_large_image_with_antialiasing_as_training_does():
    # torchvision's evaluation resize is bilinear without antialiasing: a 1-pixel checkerboard shrunk to the
    # 64 px input was point-sampled into patterns (std 0.73 after normalisation) instead of its mean grey
    transform = FixedSizeTransform(64).eval()
    yy, xx = torch.meshgrid(torch.arange(300), torch.arange(200), indexing="ij")
    board = ((yy + xx) % 2).float().expand(3, -1, -1)
    batch, _ = transform([board])
    assert batch.image_sizes == [(64, 43)]
    assert float(batch.tensors[0, :, :64, :43].flatten(1).std(1).max()) < 0.05
    detections = [{"boxes": torch.tensor([[0.0, 0.0, 43.0, 64.0]]), "labels": torch.tensor([1]),
                   "scores": torch.tensor([1.0]), "masks": torch.ones(1, 1, 28, 28)}]
    back = transform.postprocess(detections, batch.image_sizes, [(300, 200)])[0]  # the image's own pixels again
    assert back["boxes"].tolist() == [[0.0, 0.0, 200.0, 300.0]] and back["masks"].shape == (1, 1, 300, 200)


class _Oracle(torch.nn.Module):
    """A perfect detector: each call answers with the non-crowd ``annotations`` (default: the ground truth scored)
    of the next images in ``ids``, their masks at the image's size, which ``oracle_masks`` has pasted as they are."""

    def __init__(self, split, ids, annotations=None):
        super().__init__()
        self.transform = SimpleNamespace(paste_masks=True)  # what unpasted_masks switches off
        self.coco, self.ids, self.label_of = split.coco(), list(ids), {c: i + 1 for i, c in enumerate(split.categories)}
        self.annotations = self.coco.dataset["annotations"] if annotations is None else annotations

    def forward(self, images):
        outputs = []
        for _ in images:
            image_id = self.ids.pop(0)
            anns = [a for a in self.annotations if a["image_id"] == image_id and not a["iscrowd"]]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
            masks = torch.stack([torch.from_numpy(self.coco.annToMask(a)).float() for a in anns])[:, None]
            outputs.append({"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns]),
                            "scores": torch.ones(len(anns)), "masks": masks})
        return outputs


def test_a_resume_on_files_that_name_the_categories_otherwise_is_refused_in_one_line(tiny, tmp_path):
    # other annotation files may resume a run (their paths are run-control), other classes may not: a re-export
    # that numbered the same classes anew (square 7, disc 3) was resumed as the same set, labels silently swapped
    _, (ann, images) = tiny
    task = DetectTask.__new__(DetectTask)
    renumbered = [{"id": 3, "name": "disc"}, {"id": 7, "name": "square"}]  # its annotations too, in such a file
    task.val = read_coco(_edit(ann, tmp_path, lambda d: d.update(categories=renumbered)), images)
    task.categories = task.val.categories
    state = {"categories": [3, 7], "category_names": ["square", "disc"], "settings": {"val_ann": "/data/val.json"}}
    with pytest.raises(UsageError, match=r"^--resume: category 3 is 'square' in the checkpoint but 'disc' in .*"
                                         r"bad.json \(2 of 2 categories named otherwise.*--val-ann /data/val.json\)"):
        task.load(state)
    with pytest.raises(UsageError, match=r"category ids are \[3, 8\] in the checkpoint but \[3, 7\] in"):
        task.load({**state, "categories": [3, 8]})
    task.load({**state, "category_names": ["disc", "square"]})  # the same classes from other files: allowed
    task.load({"categories": [3, 7]})  # a checkpoint saved before names were kept: by its ids


def test_a_resume_of_other_categories_is_refused_before_the_images_are_checked_and_the_model_built(tiny,
                                                                                                   monkeypatch):
    from lomar.train import detect
    from lomar.train.distributed import DistInfo
    from lomar.train.task_resume import building

    def build(*args, **kwargs):  # a header read of every val image (0.8 GB for val2017), then the model
        raise AssertionError("the run was built")

    monkeypatch.setattr(detect, "check_split_images", build)
    monkeypatch.setattr(DetectTask, "_build_model", build)
    _, (ann, images) = tiny
    config = SimpleNamespace(val_ann=str(ann), val_images=str(images), eval_every=None, workers=0, pretrained=None)
    with building({"categories": [1, 2]}), pytest.raises(UsageError, match=r"^--resume: the category ids are \[1, "
                                                                           r"2\] in the checkpoint but \[3, 7\]"):
        DetectTask(config, DistInfo(), torch.device("cpu"))


@pytest.fixture(scope="module")
def ten_val(tmp_path_factory):
    """A validation split of 10 images, the first cut short (skipped with a warning when read): 10 %, as many as a
    score may leave out."""
    ann, images = write_tiny_coco(tmp_path_factory.mktemp("coco") / "val", 10, seed=1)
    first = sorted(images.glob("*.png"))[0]
    first.write_bytes(first.read_bytes()[:200])
    return read_coco(ann, images)


@pytest.fixture
def oracle_masks(monkeypatch):
    """torchvision's mask pasting, which detect's evaluation runs on each detection's mask, leaving the masks as they
    are: an :class:`_Oracle`'s are the annotations' own, at the image's size."""
    from torchvision.models.detection import roi_heads

    monkeypatch.setattr(roi_heads, "paste_masks_in_image", lambda masks, boxes, size: masks)


def test_a_validation_image_that_cannot_be_read_is_left_out_of_the_ap_not_counted_as_missed(ten_val, oracle_masks):
    split = ten_val
    metrics, task = _evaluated(split, _Oracle(split, [image["id"] for image in split.data["images"][1:]]))
    assert metrics["box_AP"] == pytest.approx(100.0) and metrics["mask_AP"] == pytest.approx(100.0)
    assert {r["image_id"] for r in task.predictions} == {image["id"] for image in split.data["images"][1:]}
    assert metrics["val_images"] == {"scored": 9, "skipped": 1}  # the record says the score is over part of the split


def test_a_score_over_part_of_the_validation_split_says_so(ten_val, tmp_path, capsys, monkeypatch, oracle_masks):
    """--eval-only's record and result line, and before every epoch line of a run, the images scored and skipped
    (each skipped one is warned of only at its first read); more than 10 % skipped stops in one line."""
    from lomar.train import detect

    split, ids = ten_val, [image["id"] for image in ten_val.data["images"][1:]]
    note = f"{split.root}: 1 unreadable image(s) skipped, at most 10% of a split"
    monkeypatch.setattr(detect, "DetectTask", lambda *args: _evaluated(split, _Oracle(split, ids), score=False)[1])
    config = SimpleNamespace(out=str(tmp_path / "ev"), pretrained="detector.pt", img_size=64, seed=0, device="cpu",
                             threads=torch.get_num_threads())  # --eval-only sets it: keep this process's
    assert detect.evaluate_only(config) == 0
    record = json.loads((tmp_path / "ev" / "metrics.jsonl").read_text())
    assert record["val_images"] == {"scored": 9, "skipped": 1} and record["box_AP"] == pytest.approx(100.0)
    assert capsys.readouterr().err.splitlines()[-1] == (f"lomar detect: box_AP 100.00%, mask_AP 100.00% over 9 images "
                                                        f"({note}); {tmp_path / 'ev' / 'predictions.json'}")
    _, task = _evaluated(split, _Oracle(split, ids * 2), score=False, run=True)
    for _ in range(2):  # a run's evaluations: each says it, the epoch line following
        assert task.evaluate()["val_images"] == {"scored": 9, "skipped": 1}
        assert capsys.readouterr().out == note + "\n"
    three = read_coco(*write_tiny_coco(tmp_path / "three", 3, seed=1))
    first = three.root / three.data["images"][0]["file_name"]
    first.write_bytes(first.read_bytes()[:200])
    with pytest.raises(TrainingError, match=rf"^{re.escape(str(three.root))}: 1 of 3 images \(over 10%\) could not be "
                                         rf"used, e\.g\. cannot decode image {re.escape(str(first))}: .*; fix or "
                                         rf"remove them$"):
        _evaluated(three, _Oracle(three, [2, 3]))


def _evaluated(split, model, score: bool = True, run: bool = False) -> tuple[dict | None, DetectTask]:
    """(metrics, task) of DetectTask's evaluation alone (``score`` False: not yet made, None), of ``split`` by
    ``model``, in this process; ``run``: a training run's evaluation, not --eval-only's."""
    from torch.utils.data import DataLoader

    from lomar.train.distributed import DistInfo

    task = DetectTask.__new__(DetectTask)
    task.val, task.categories, task.info, task.device = split, split.categories, DistInfo(), torch.device("cpu")
    task.val_loader = DataLoader(detection_dataset(split, eval_transforms(), train=False), 2,
                                 collate_fn=collate_detection)
    task.model, task.train_loader, task.source = model, [] if run else None, {}
    return task.evaluate() if score else None, task


def test_the_ap_is_cocoevals_on_the_file_as_written_not_on_the_boxes_clipped_for_training(tiny, tmp_path,
                                                                                          oracle_masks):
    """Training clips a box to its image and leaves out one of zero area; the AP is scored, as detectron2 and papers
    score it, by COCOeval on the file itself: a detector that finds every object inside its image misses the box
    reaching outside it at the higher IoUs, and the object of zero area (its mask is not empty) altogether."""
    _, (ann, images) = tiny
    data = json.loads(ann.read_text())
    outside, empty = data["annotations"][0], data["annotations"][-1]
    assert outside["image_id"] != empty["image_id"]
    width = next(image["width"] for image in data["images"] if image["id"] == outside["image_id"])
    outside["bbox"][2] = (width - outside["bbox"][0]) * 1.5  # a third outside: IoU 2/3 with the clipped box
    empty["bbox"][3] = 0.0
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(data))
    split = read_coco(path, images)
    assert (split.summary.clipped, split.summary.zero_area) == (1, 1)
    ids = [image["id"] for image in split.data["images"]]
    metrics, task = _evaluated(split, _Oracle(split, ids, split.data["annotations"]))  # the targets trained on
    by_hand = _rescore(path, task.predictions)
    assert metrics.keys() == by_hand.keys()
    for key, value in by_hand.items():
        assert (metrics[key] is None) == (value is None), key
        assert value is None or math.isclose(metrics[key], value), (key, metrics[key], value)  # the targets: 100
    assert by_hand["box_AP"] < 95 and by_hand["mask_AP"] < 95
