"""The loader benchmark, the test-set maker and the faster decoding paths it compares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lomar.bench.loader import loader_dataset, measure_loader
from lomar.bench.testset import TEST_SET_SIZES, make_test_set
from lomar.cli.app import main
from lomar.data.decode import load_image
from lomar.data.demo_images import demo_image_paths
from lomar.data.fast_decode import draft_decode_crop, gpu_decode_crops, jpeg_size, window_boxes
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, draw_sample

WINDOW = 3


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four demo photographs as 1024x768 JPEGs (large enough for 1/4 and 1/8 DCT scaling)."""
    folder = tmp_path_factory.mktemp("photos")
    for i, path in enumerate(demo_image_paths()[:4]):
        with Image.open(path) as img:
            img.convert("RGB").resize((1024, 768), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return folder


def _pixels(item: dict) -> torch.Tensor:
    return denormalize(item["image"][None])[0] * 255


def _window_mask(top_left: torch.Tensor, patch: int, size: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    for r, c in (top_left * patch).tolist():
        mask[r:r + WINDOW * patch, c:c + WINDOW * patch] = True
    return mask


def test_make_test_set_writes_into_no_folder_of_other_files(tmp_path, capsys):
    from lomar.cli.app import main

    (tmp_path / "photo.png").write_bytes(b"mine")
    code = main(["bench", "--task", "loader", "--data", str(tmp_path), "--make-test-set", "imagenet",
                 "--test-set-count", "1", "--images", "1", "--sizes", "64", "--no-model", "--repeats", "1",
                 "--workers", "0", "--loader-windows", "1", "--quiet"])
    assert code == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    assert f"{tmp_path} holds photo.png, which is not a test-set file" in capsys.readouterr().err


def test_make_test_set_writes_jpegs_of_the_kind_and_reuses_them(tmp_path):
    paths = make_test_set(tmp_path, "imagenet", 3, processes=1)
    assert [p.name for p in sorted(tmp_path.iterdir())] == [p.name for p in paths]  # no temp files left
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.size == TEST_SET_SIZES["imagenet"]
    stamp = paths[0].stat().st_mtime_ns
    make_test_set(tmp_path, "imagenet", 3, processes=1)
    assert paths[0].stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown test-set kind 'phone'"):
        make_test_set(tmp_path, "phone", 1)



def test_draft_decodes_a_photo_stored_sideways_reduced_and_upright(photos, tmp_path, monkeypatch):
    """A phone stores a portrait photo sideways with EXIF orientation 6: --decode draft decoded it whole
    (the reference path), so a phone's portrait photos gained nothing."""
    from PIL import JpegImagePlugin

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display: stored turned the other way, it shows as the original
    for path in sorted(photos.iterdir()):
        with Image.open(path) as img:
            img.transpose(Image.Transpose.ROTATE_90).save(tmp_path / path.name, quality=90, exif=exif)
    scales = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda img, mode, size: scales.append(img.size[0] // size[0]) or draft(img, mode, size))
    for sideways in (True, False):  # the same crops and plans as the upright photos, and about the same pixels
        full = loader_dataset(photos, 64, "lomar", 2, 8, "full", window_size=WINDOW)
        fast = loader_dataset(tmp_path if sideways else photos, 64, "lomar", 2, 8, "draft", window_size=WINDOW)
        for index in range(8):
            a, b = full[(index, 3)], fast[(index, 3)]
            assert torch.equal(a["top_left"], b["top_left"]) and torch.equal(a["mask"], b["mask"])
            assert float((_pixels(a) - _pixels(b)).abs().mean()) < 4.0
    assert len(scales) == 16 and min(scales) >= 2, scales  # every one decoded at 1/2 scale or less

@pytest.mark.parametrize("size, patch", [(64, 8), (224, 16)])
def test_draft_decoding_keeps_crops_and_plans_with_bounded_pixel_differences(photos, size, patch):
    full = loader_dataset(photos, size, "lomar", 2, patch, "full", window_size=WINDOW)
    draft = loader_dataset(photos, size, "lomar", 2, patch, "draft", window_size=WINDOW)
    means = []
    for index in range(12):
        a, b = full[(index, 3)], draft[(index, 3)]
        assert torch.equal(a["top_left"], b["top_left"]) and torch.equal(a["mask"], b["mask"])
        diff = (_pixels(a) - _pixels(b)).abs()
        means.append(float(diff.mean()))
        assert float(diff.max()) < 48  # a few pixels at sharp edges; a shifted box differs everywhere
    # Measured on these photos: at most 2.2 (64 px) and 0.8 (224 px) levels of 255 per image.
    assert max(means) < 4.0, means


@pytest.mark.parametrize("decode", ["draft", "windows"])
def test_fast_paths_that_gain_nothing_are_the_reference_path(tmp_path, decode):
    # 500x375: no crop keeps 224 px at 1/2 scale; 4 windows of 112 px would fill the 224 px crop.
    make_test_set(tmp_path, "imagenet", 2, processes=1)
    full = loader_dataset(tmp_path, 224, "lomar", 4, 16, "full")
    draft = loader_dataset(tmp_path, 224, "lomar", 4, 16, decode)
    for index in range(4):
        a, b = full[(index, 0)], draft[(index, 0)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["top_left"], b["top_left"])


def test_draft_decoding_really_decodes_a_reduced_image(photos):
    transform = loader_dataset(photos, 64, "lomar", 2, 8, "full", window_size=WINDOW).transform
    decoded = []
    original = Image.Image.convert

    def spy(img, *args, **kwargs):
        decoded.append(img.size)
        return original(img, *args, **kwargs)

    Image.Image.convert = spy
    try:
        path = sorted(photos.iterdir())[0]
        draw = draw_sample(transform, None, *jpeg_size(path), torch.Generator().manual_seed(1))
        with Image.open(path) as img:
            pixels = draft_decode_crop(img, transform.size, draw, "photo.jpg")
    finally:
        Image.Image.convert = original
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8
    # A crop of >= 20 % of 1024x768 is >= ~390 px wide: 1/4 scale still leaves >= 64 px.
    assert decoded and max(decoded)[0] <= 256


@pytest.mark.parametrize("size, patch", [(64, 8), (224, 16)])
def test_window_only_resampling_matches_the_full_path_inside_the_windows(photos, size, patch):
    full = loader_dataset(photos, size, "lomar", 2, patch, "full", window_size=WINDOW)
    windows = loader_dataset(photos, size, "lomar", 2, patch, "windows", window_size=WINDOW)
    blank = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1)
    for index in range(12):
        a, b = full[(index, 0)], windows[(index, 0)]
        assert torch.equal(a["top_left"], b["top_left"]) and torch.equal(a["mask"], b["mask"])
        inside = _window_mask(a["top_left"], patch, size)
        assert torch.equal(b["image"][:, ~inside], blank.expand(3, int((~inside).sum())))
        diff = (_pixels(a) - _pixels(b)).abs()[:, inside]
        # Measured: at most 2.6 (64 px) and 1.4 (224 px) levels mean, 21 max, on these photos.
        assert float(diff.mean()) < 4.0 and float(diff.max()) < 48


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_batched_decode_crop_resize_matches_the_reference_transform(photos, device):
    from torchvision.transforms.v2 import functional as TF

    paths = sorted(photos.iterdir())
    datas = [p.read_bytes() for p in paths]
    transform = loader_dataset(photos, 64, "lomar", 2, 8, "full", window_size=WINDOW).transform
    gen = torch.Generator().manual_seed(0)
    boxes = [transform.crop_box(*jpeg_size(d), gen) for d in datas]
    flips = [i % 2 == 0 for i in range(len(datas))]
    out = gpu_decode_crops(datas, boxes, 64, flips, device=device).cpu()
    assert out.shape == (len(paths), 3, 64, 64) and out.dtype == torch.uint8
    for path, (top, left, h, w), flip, got in zip(paths, boxes, flips, out):
        want = TF.resized_crop(load_image(path), top, left, h, w, [64, 64],
                               interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        diff = ((want.flip(-1) if flip else want).int() - got.int()).abs()
        # float vs uint8 resampling kernels (and nvjpeg's IDCT on CUDA): measured <= 5 levels, mean 0.2
        assert int(diff.max()) <= 12 and float(diff.float().mean()) < 1.0


def test_window_boxes_mirror_columns_of_a_flipped_crop():
    boxes = window_boxes((10.0, 20.0, 110.0, 120.0), 100, torch.tensor([[0, 0]]), 30, flipped=True)
    (box, r, c), = boxes
    # Output columns 0..30 of the flipped crop are source columns 70..100 of the box.
    assert (r, c) == (0, 0) and box == pytest.approx((80.0, 20.0, 110.0, 50.0))


def test_windows_decode_needs_a_windowed_method(photos):
    with pytest.raises(ValueError, match="needs a windowed method"):
        loader_dataset(photos, 64, "mae", None, 8, "windows")


def test_measure_loader_records_say_which_side_limits(photos):
    records = measure_loader(photos, [64], workers=0, windows=2, decode="draft", images=8, batch_size=4,
                             model="vit_tiny_patch8", model_batch=2, steps=1, warmup=0, tiny=True)
    (rec,) = records
    assert rec["task"] == "loader" and rec["images"] == 4 and rec["decode"] == "draft"
    assert rec["images_per_s"] > 0 and rec["model_images_per_s"] > 0
    expected = "loader" if rec["loader_images_per_s"] < rec["model_images_per_s"] else "model"
    assert rec["limited_by"] == expected


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")])
def test_a_model_step_that_fails_says_so(photos, monkeypatch, error):
    # the bench's timing goes on past a failed configuration; the loader's one model has nothing to go on with
    from lomar.bench import timing

    def failing(runner):
        raise error

    monkeypatch.setattr(timing.StepRunner, "count_flops", failing)
    with pytest.raises(RuntimeError, match=f"the model's step at 64px failed at its FLOP-counting step: "
                                           f"{type(error).__name__}: {str(error)[:20]}") as raised:
        measure_loader(photos, [64], workers=0, windows=2, decode="draft", images=4, batch_size=4,
                       model="vit_tiny_patch8", model_batch=2, steps=1, warmup=0, tiny=True)
    # a failure that may be a bug says where it was raised; running out of memory, its line alone
    assert ("in failing\n" in str(raised.value)) == (type(error) is RuntimeError)


def test_unreadable_images_are_not_counted_as_loads(photos, tmp_path, capsys):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(photos, mixed)
    for i in range(4):
        (mixed / f"junk{i}.jpg").write_bytes(b"not a jpeg" * 50)
    (rec,) = measure_loader(mixed, [64], workers=0, windows=2, decode="full", images=8, batch_size=4,
                            model="vit_tiny_patch8", model_rate=False)
    assert rec["images"] == 8 and rec["unreadable"] == 4
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(4):
        (broken / f"junk{i}.jpg").write_bytes(b"not a jpeg" * 50)
    assert main(["bench", "--task", "loader", "--data", str(broken), "--sizes", "64", "--model", "vit_tiny_patch8",
                 "--loader-windows", "2", "--no-model", "--quiet", "--workers", "0"]) == 2
    assert "none of the 4 images timed could be read; check --data" in capsys.readouterr().err
    # a plan that cannot fit the grid is one line, not every image "unreadable"
    assert main(["bench", "--task", "loader", "--data", str(photos), "--sizes", "64", "--model", "vit_base_patch16",
                 "--no-model", "--quiet", "--workers", "0"]) == 2
    assert capsys.readouterr().err == ("lomar bench: error: 64px: a 7x7 window does not fit the 4x4 patch grid; use "
                                       "a larger size (--sizes) or a model of smaller patches\n")
    assert main(["bench", "--task", "loader", "--data", str(photos), "--sizes", "64", "--model", "vit_tiny_patch8",
                 "--loader-windows", "4", "--no-model", "--quiet", "--workers", "0"]) == 2  # placed as pretrain
    # places them, 4 do not fit the 8x8 grid
    err = capsys.readouterr().err
    assert err.endswith("pass --loader-windows <= 2 or use a larger image\n") and "placement" not in err


def test_a_plan_that_cannot_fit_is_told_in_the_benchs_terms_whatever_the_librarys_wording(photos, monkeypatch):
    # the bench rewrote the library's message by matching its words: a rewording would have reached the user as is
    from lomar.models import masking

    init = masking.WindowsDoNotFit.__init__

    def reworded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.args = (f"{self.param} too large, at most {self.most}",)

    monkeypatch.setattr(masking.WindowsDoNotFit, "__init__", reworded)
    with pytest.raises(ValueError) as info:
        loader_dataset(photos, 64, "lomar", 4, patch_size=16)
    assert str(info.value) == ("64px: a 7x7 window does not fit the 4x4 patch grid; use a larger size (--sizes) or a "
                               "model of smaller patches")
    with pytest.raises(ValueError, match=r"^64px: --loader-windows 4 asks for more 7x7 windows than fit: .*; pass "
                                         r"--loader-windows <= 2 or use a larger image$"):
        loader_dataset(photos, 64, "lomar", 4, patch_size=8)


def test_the_loader_bench_draws_pretrains_window_count_at_each_size_by_default(photos, tmp_path):
    # a fixed 4 at every size timed --decode windows (and the model step) with 4 windows where a 256 px run draws 12
    out = tmp_path / "loader.json"
    assert main(["bench", "--task", "loader", "--data", str(photos), "--sizes", "128", "256", "--model",
                 "vit_tiny_patch8", "--images", "2", "--batch-size", "2", "--decode", "windows", "--workers", "0",
                 "--no-model", "--quiet", "--json", str(out)]) == 0
    assert [r["windows"] for r in json.loads(out.read_text())["records"]] == [4, 12]  # --print-config's at 128, 256
    assert main(["bench", "--task", "loader", "--data", str(photos), "--sizes", "256", "--model", "vit_tiny_patch8",
                 "--images", "2", "--batch-size", "2", "--workers", "0", "--loader-windows", "3", "--no-model",
                 "--quiet", "--json", str(tmp_path / "fixed.json")]) == 0
    assert [r["windows"] for r in json.loads((tmp_path / "fixed.json").read_text())["records"]] == [3]


def test_loader_command_prints_rates_and_writes_json(photos, tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert main(["bench", "--task", "loader", "--data", str(photos), "--sizes", "64", "--workers", "1", "--images", "8",
                                 "--batch-size", "2", "--model", "vit_tiny_patch8", "--loader-windows", "2",
                                 "--steps", "1", "--warmup", "0", "--tiny", "--quiet", "--json", str(out),
                                 "--decode", "full", "draft"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "img/s/worker" in lines[0] and len(lines) == 3
    assert all(line.split()[-1] in ("loader", "model") for line in lines[1:])
    records = json.loads(out.read_text())["records"]
    assert [r["decode"] for r in records] == ["full", "draft"]
    for rec in records:  # the model is timed once per size; both rows get its rate and a verdict
        assert rec["task"] == "loader" and {"images_per_s", "model_images_per_s", "cpu_ms_per_image"} <= rec.keys()
        expected = "loader" if rec["loader_images_per_s"] < rec["model_images_per_s"] else "model"
        assert rec["limited_by"] == expected
    assert records[0]["model_images_per_s"] == records[1]["model_images_per_s"]


@pytest.mark.parametrize("flags, message", [
    ([], "needs --data"),
    (["--data", "/no/such/dir"], "does not exist"),
    (["--data", "{photos}", "--loader-method", "mae", "--decode", "windows"], "needs a windowed method"),
    (["--data", "{photos}", "--workers", "-1"], "--workers must be >= 0"),
])
def test_loader_command_bad_input_is_a_usage_error(photos, flags, message, capsys):
    flags = [f.format(photos=photos) for f in flags]
    code = main(["bench", "--task", "loader", "--sizes", "64", "--model", "vit_tiny_patch8", "--no-model",
                 "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
