"""finetune --decode draft: the recipe's training crops of JPEGs decoded at a DCT scale, with --decode full's draws."""

import random
import shutil

import pytest
import torch
from PIL import Image, JpegImagePlugin

from helpers import photo_like
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.classify import SeededSamples, classification_transforms
from lomar.data.draft_classify import DraftCropFolder
from lomar.data.folder import LabelledImageFolder
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("draftcls")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's portrait photo, stored sideways: turned upright by a quarter turn clockwise
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "b").mkdir(parents=True)
        Image.fromarray(photo_like(512, 384)).transpose(Image.Transpose.ROTATE_90).save(root / split / "a" / "side.jpg",
                                                                                     quality=90, exif=exif)
        Image.fromarray(photo_like(384, 512)).save(root / split / "a" / "wide.jpg", quality=90)
        Image.fromarray(photo_like(48, 64)).save(root / split / "b" / "tiny.jpg", quality=90)  # no box of 2 x 32 px
        Image.fromarray(photo_like(300, 400)).save(root / split / "b" / "small.png")
    data = (root / "train" / "a" / "wide.jpg").read_bytes()
    (root / "train" / "b" / "cut.jpg").write_bytes(data[:len(data) // 3])  # unreadable
    return root


class _Spy:
    """Records the random streams' states where it stands in the transform (draws nothing)."""

    def __init__(self):
        self.states = []

    def __call__(self, image):
        self.states.append((random.getstate(), torch.get_rng_state()))
        return image


def _items(root, **recipe):
    train_tf, _ = classification_transforms(32, **recipe)
    spy = _Spy()
    train_tf.transforms.insert(1, spy)  # after the crop: the flip, RandAugment and erasing must draw as full's
    full = LabelledImageFolder(root / "train", train_tf)
    return full, SeededSamples(full, 3), SeededSamples(DraftCropFolder(full), 3), spy


def _levels(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255 + torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255


def test_draft_crops_are_the_full_paths_boxes_decoded_at_a_dct_scale(photos, monkeypatch):
    """A camera photo's training crop was decoded whole (230 ms at 12 MP, 60 drafted): now at the largest DCT scale
    keeping the drawn box >= the image size, upright as the EXIF says; the streams after the crop are full's."""
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda img, mode, size: scales.append(img.size[0] // size[0]) or draft(img, mode, size))
    full, s_full, s_draft, spy = _items(photos, aa="none", reprob=0)
    names = [full.paths.text(i).rsplit("/", 1)[1] for i in range(len(full))]
    for epoch in range(4):
        for i, name in enumerate(names):
            a, b = s_full[(i, epoch)], s_draft[(i, epoch)]
            assert spy.states[-1][0] == spy.states[-2][0] and torch.equal(spy.states[-1][1], spy.states[-2][1])
            assert a[1:] == b[1:] and a.source == b.source, name
            if name in ("side.jpg", "wide.jpg"):
                diff = (_levels(a[0]) - _levels(b[0])).abs()
                assert float(diff.mean()) < 2.0 and float(diff.max()) < 48, (name, epoch)
            elif name == "cut.jpg":
                assert a[0] is None and b[0] is None
            else:  # no reduced decode: the reference path, bit for bit
                assert torch.equal(a[0], b[0]), name
    assert len(scales) >= 8 and min(scales) >= 2  # the two photos (and the cut one's try) each epoch, reduced


def test_draft_keeps_the_recipes_augmentation_draws(photos):
    """RandAugment and erasing see the draft crop where they saw full's, drawing the same ops."""
    full, s_full, s_draft, spy = _items(photos)
    side = next(i for i in range(len(full)) if full.paths.text(i).endswith("side.jpg"))
    diffs = []
    for epoch in range(3):
        a, b = s_full[(side, epoch)][0], s_draft[(side, epoch)][0]
        assert spy.states[-1][0] == spy.states[-2][0] and torch.equal(spy.states[-1][1], spy.states[-2][1])
        diffs.append(float((_levels(a) - _levels(b)).abs().mean()))
    assert max(diffs) < 4.0, diffs


def test_draft_needs_timms_random_resized_crop(photos):
    _, val_tf = classification_transforms(32)
    with pytest.raises(ValueError, match="starts with timm's random resized crop"):
        DraftCropFolder(LabelledImageFolder(photos / "val", val_tf))


@pytest.mark.slow
def test_finetune_decode_draft_trains_and_refuses_the_pretraining_only_modes(photos, pretrained, tmp_path, capsys,
                                                                             monkeypatch):
    cropped, crop = [], DraftCropFolder._crop
    monkeypatch.setattr(DraftCropFolder, "_crop",
                        lambda self, img, path: cropped.append(crop(self, img, path)) or cropped[-1])
    shutil.copytree(photos, tmp_path / "data", ignore=shutil.ignore_patterns("cut.jpg"))
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(tmp_path / "data"), "--img-size", "32",
            "--batch-size", "4", "--workers", "0", "--threads", "1", "--device", "cpu", "--max-steps", "2",
            "--epochs", "2", "--warmup-epochs", "0"]
    assert main([*args, "--out", str(tmp_path / "ft"), "--decode", "draft"]) == 0, capsys.readouterr().err
    assert safe_load(tmp_path / "ft" / "last.pt")["settings"]["decode"] == "draft"
    assert any(image is not None for image in cropped)  # training photos' crops decoded reduced (workers 0: here)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "gpu"), "--decode", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "argument --decode: invalid choice: 'gpu' (choose from 'full', 'draft')" in err
    assert err.count("\n") == 1 and not (tmp_path / "gpu").exists()


def test_a_cameras_mpo_photo_is_drafted_as_a_jpeg(tmp_path, monkeypatch):
    """A camera's JPEG with its preview after the photo (Pillow's MPO) was decoded whole, as a PNG is."""
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(photo_like(384, 512)).save(tmp_path / "train" / name / "camera.jpg", "MPO", save_all=True,
                                                   append_images=[Image.fromarray(photo_like(48, 64))], quality=90)
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda img, mode, size: scales.append(img.size[0] // size[0]) or draft(img, mode, size))
    _, s_full, s_draft, _ = _items(tmp_path, aa="none", reprob=0)
    a, b = s_full[(0, 0)], s_draft[(0, 0)]
    assert scales and min(scales) >= 2 and a[1:] == b[1:]
    assert float((_levels(a[0]) - _levels(b[0])).abs().mean()) < 2.0
