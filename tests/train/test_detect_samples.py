"""`lomar detect`'s training and validation samples: the jitter keeps boxes, masks and labels together, a sample is a
function of seed, epoch and index, an image that cannot be used is skipped with a warning (too many stop the run),
and an EXIF-rotated image is read upright."""

from __future__ import annotations

import json
import shutil

import torch
from PIL import Image

from lomar.cli.app import main
from lomar.data.coco import collate_detection, detection_dataset, read_coco, training_split
from lomar.data.collate import Skipped
from lomar.data.jitter import eval_transforms, train_transforms


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
                 "--val-images", str(val_images), "--model", "vit_mini_patch16", "--img-size", "64",
                 "--batch-size", "2", "--max-steps", "3", "--rois-per-image", "16", "--workers", "0",
                 "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert (f"1 image could not be used so far, over 10% of the 6 an epoch reads (3 batch(es) of 2 per process), e.g. "
            f"cannot decode image {truncated}") in err


def test_exif_rotated_image_is_read_upright(tiny, tmp_path):

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
