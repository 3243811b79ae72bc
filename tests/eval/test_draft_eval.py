"""knn / linprobe --decode draft: camera JPEGs decoded at a DCT scale, with the full decode's crops."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torch.utils.data import DataLoader, TensorDataset

from helpers import photo_like
from lomar import VisionTransformer, ViTConfig, export_encoder
from lomar.cli.app import main
from lomar.data.decode import load_image, tensor_to_pil
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lomar.eval.features import extract_features, knn_loaders


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    portrait = photo_like(1024, 768)
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's portrait photo, stored sideways: turned upright by a quarter turn clockwise
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "b").mkdir(parents=True)
        Image.fromarray(portrait).transpose(Image.Transpose.ROTATE_90).save(root / split / "a" / "side.jpg",
                                                                             quality=90, exif=exif)
        # sides that divide by 2 only
        Image.fromarray(photo_like(766, 1020)).save(root / split / "a" / "odd.jpg", quality=90)
        Image.fromarray(photo_like(300, 400)).save(root / split / "b" / "small.png")
        data = (root / split / "a" / "odd.jpg").read_bytes()
        (root / split / "b" / "cut.jpg").write_bytes(data[:len(data) * 2 // 3])  # unreadable
    return root


def _levels(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255 + torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255


def test_draft_decodes_jpegs_reduced_with_the_full_decodes_crops(photos, monkeypatch):
    """The 12 MP photo the evaluation resizes to 256 px was decoded whole; now at the DCT scale that keeps its short
    side at least the resize's and divides its sides (same proportions, same resized size), upright as the tag says."""
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda img, mode, size: scales.append(img.size[0] // size[0]) or draft(img, mode, size))
    full = knn_loaders(photos, img_size=32, workers=0, decode="full")[0].dataset
    reduced = knn_loaders(photos, img_size=32, workers=0, decode="draft")[0].dataset
    # each listing checks its training classes' images up to the first that reads at 1/8 (match_classes: a class can
    # be learnt from, lomar.data.decode_check): a's odd.jpg, b's cut.jpg (which fails there, then whole)
    assert scales == [8, 8] * 2
    scales.clear()
    items = {full.paths.text(i).rsplit("/", 1)[1]: (full[i][0], reduced[i][0]) for i in range(len(full))}
    assert scales == [2, 8, 2]  # the odd-sized photo, the sideways one, the cut one (that decode fails)
    for name in ("side.jpg", "odd.jpg"):
        a, b = items[name]
        diff = (_levels(a) - _levels(b)).abs()
        assert a.shape == b.shape == (3, 32, 32) and float(diff.mean()) < 2.0 and float(diff.max()) < 48, name
    assert torch.equal(*items["small.png"])  # no reduced decode: the reference path, bit for bit
    assert items["cut.jpg"] == (None, None)  # unreadable, as the reference path finds it


def test_knn_decode_draft_scores_and_refuses_the_pretraining_only_modes(photos, tmp_path, capsys):
    torch.manual_seed(0)
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
                   tmp_path / "enc")
    shutil.copytree(photos, tmp_path / "data", ignore=shutil.ignore_patterns("cut.jpg"))
    common = [str(tmp_path / "enc"), "--data", str(tmp_path / "data"), "--workers", "0", "--k", "1"]
    assert main(["knn", *common, "--decode", "draft", "--json", str(tmp_path / "knn.json")]) == 0, \
        capsys.readouterr().err
    assert "k-NN (k=1" in capsys.readouterr().out
    result = json.loads((tmp_path / "knn.json").read_text())  # how the score was had: it did not say
    assert (result["decode"], result["img_size"]) == ("draft", 32)
    probe = ["linprobe", *common[:-2], "--decode", "draft", "--epochs", "1", "--json", str(tmp_path / "lp.json")]
    assert main(probe) == 0
    assert json.loads((tmp_path / "lp.json").read_text())["decode"] == "draft"
    assert main(["knn", *common, "--decode", "windows"]) == 2  # only the pretraining transform has windows
    assert "invalid choice: 'windows' (choose from 'full', 'draft')" in capsys.readouterr().err


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_upright_turned_photo_reaches_the_transforms_as_pillow_transposes_it(tmp_path, orientation):
    """A photo stored sideways decodes to a transposed view; copied strided into a PIL image it took 527 ms at 12 MP
    (the whole of a sideways photo's extra 430 ms in knn, linprobe and finetune), Pillow's own transpose 123 ms."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(photo_like(48, 64)).save(tmp_path / "photo.jpg", quality=90, exif=exif)
    image = load_image(tmp_path / "photo.jpg")
    turned = tensor_to_pil(image)
    assert turned.mode == "RGB" and np.array_equal(np.asarray(turned), image.permute(1, 2, 0).numpy())
    assert image.shape[1:] == ((64, 48) if orientation >= 5 else (48, 64))
    if orientation >= 5:  # the decoder's rows, transposed: what Pillow turns back
        assert image.permute(1, 2, 0).transpose(0, 1).is_contiguous()


def test_features_fill_one_block_instead_of_joining_a_list_of_batches(monkeypatch):
    """Joined at the end, the batches' features were held twice: 1,213 MiB of peak for 586 MiB of features (3.9 GB
    more for ImageNet's training split with ViT-B); filled into one block, 728. Repeating samplers still fit."""
    class Encoder(torch.nn.Module):
        def forward_features(self, images):  # (B, 1 + 2, 4): image i's tokens are i, i + 1 and i + 2
            return (images[:, :1, None] + torch.arange(3)[None, :, None]).expand(-1, 3, 4)

    data = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10) % 3)
    joined, cat = [], torch.cat

    def spy(tensors, *args, **kwargs):
        joined.extend(t.dim() for t in tensors)
        return cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", spy)
    feats, labels = extract_features(Encoder(), DataLoader(data, batch_size=4))
    assert 2 not in joined  # only the labels' batches are joined
    assert torch.equal(feats, torch.arange(10.0)[:, None].expand(-1, 4) + 1.5) and torch.equal(labels, data.tensors[1])
    sampler = [i % 10 for i in range(25)]  # more rows than the dataset: the block grows
    feats, labels = extract_features(Encoder(), DataLoader(data, batch_size=4, sampler=sampler))
    assert feats.shape == (25, 4) and torch.equal(feats[:, 0], torch.tensor(sampler, dtype=torch.float32) + 1.5)


def test_knn_every_follows_the_runs_draft_decode_and_a_resume_keeps_what_the_run_started_with(tmp_path, image_dir,
                                                                                               monkeypatch, capsys):
    """--knn-every decoded --knn-data's photos whole under --decode draft (12 MP photos at 64 px: 145 ms an image,
    17 drafted); it now follows the run's decode, recorded at the start as --knn-decode: a resume keeps it whatever
    its --decode, and a run saved before the setting keeps the full decode it scored with."""
    import lomar.data.folder as folder
    import lomar.eval.features as features
    from helpers import pretrain

    reduced, load = [], features.load_image_reduced
    spy = lambda *a, **kw: reduced.append(1) or load(*a, **kw)  # noqa: E731
    monkeypatch.setattr(features, "load_image_reduced", spy)
    monkeypatch.setattr(folder, "load_image_reduced", spy)  # where the class folder tells its check by it
    root = tmp_path / "knn"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.fromarray(photo_like(96, 128)).save(root / split / label / "p.jpg", quality=90)
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--decode", "draft", "--knn-every", "1",
                    "--knn-data", str(root), "--max-steps", "1") == 0
    # the k-NN's train and val photos, each read once at the draft scale (its classes' check is
    # lomar.data.decode_check's, not this load)
    assert len(reduced) == 4
    capsys.readouterr()

    def resumed(*args: str) -> str:
        code = main(["pretrain", "--out", str(out), "--resume", "auto", *args, "--print-config"])
        captured = capsys.readouterr()
        return captured.out if code == 0 else captured.err.strip()

    assert "knn_decode: draft" in resumed("--decode", "full")  # --decode may change on resume; the k-NN's may not
    assert "error: --knn-decode full differs from draft in the run being resumed" in resumed("--knn-decode", "full")
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    del checkpoint["config"]["knn_decode"]  # as a run saved before the setting
    torch.save(checkpoint, out / "last.pt")
    assert "knn_decode: full" in resumed("--decode", "draft")
    new = main(["pretrain", "--data", str(image_dir), "--out", str(tmp_path / "r2"), "--print-config"])
    assert new == 0 and "knn_decode: full" in capsys.readouterr().out  # --decode full's
