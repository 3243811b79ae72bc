"""The one sample draw: every decode path takes its crop box, flip and masking plan from
``draw_sample`` on the sample's (seed, epoch, index) generator, and skips what the reference
path skips (files over the pixel limit, headers Pillow refuses as decompression bombs)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lomar.data import device_decode
from lomar.data.device_decode import EncodedPretrainDataset, decode_dataset
from lomar.data.fast_decode import FastPretrainDataset, jpeg_size, window_boxes
from lomar.data.folder import build_pretrain_dataset
from lomar.data.transforms import PretrainTransform, draw_sample, sample_generator, sample_seed
from lomar.methods import get_method

SIZE = 32


class _Cfg:  # the settings the LoMaR masker reads
    window_size, windows, mask_ratio = 2, 2, 0.75


def _jpeg(path: Path, height: int, width: int, seed: int = 0) -> None:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * (seed + 2)) % 256, (y * 3) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i, (h, w) in enumerate([(300, 400), (90, 70), (256, 520)]):  # reduced decode, reference, reduced
        _jpeg(root / f"photo{i}.jpg", h, w, i)
    return root


def _base(root: Path):
    masker = get_method("lomar").masker(_Cfg(), (SIZE // 8, SIZE // 8))
    return build_pretrain_dataset(str(root), SIZE, seed=5, masker=masker)


def _readers(base) -> dict:
    return {"full": base, "draft": FastPretrainDataset(base, "draft"),
            "windows": FastPretrainDataset(base, "windows", 8, _Cfg.window_size, 1),
            "gpu": EncodedPretrainDataset(base)}


def test_every_decode_path_takes_its_draws_from_draw_sample(photos):
    base = _base(photos)
    for mode, reader in _readers(base).items():
        for index in range(len(base)):
            for epoch in (0, 3):
                path = base.paths[index]
                want = draw_sample(base.transform, base.masker, *jpeg_size(path),
                                   sample_generator(5, epoch, index))
                item = reader[(index, epoch)]
                assert item["path"] == str(path)
                for name, value in want.plan.items():
                    assert torch.equal(item[name], value), (mode, index, epoch, name)
                if item.get("encoded") is not None:  # the device decodes later: the item carries box and flip
                    assert tuple(item["box"].tolist()) == want.box and item["flip"] == want.flip


def test_the_draws_of_a_sample_are_what_they_were():
    # Golden values: a resumed run redraws its samples from (seed, epoch, index), so a change to the seeding, to
    # how many numbers a draw takes or to their order changes what the rest of a resumed epoch trains on.
    assert [sample_seed(*key) for key in [(0, 0, 0), (5, 3, 17), (2 ** 31, 1, 10 ** 6)]] == [
        6375474604893067239, 1124121604463999453, 3201910468864956488]
    cfg = type("Cfg", (), {"window_size": 4, "windows": 2, "mask_ratio": 0.5})()
    draw = draw_sample(PretrainTransform(64), get_method("lomar").masker(cfg, (8, 8)), 300, 400,
                       sample_generator(5, 3, 17))
    assert (draw.box, draw.flip, draw.plan["top_left"].tolist()) == ((21, 90, 222, 193), True, [[0, 1], [4, 4]])
    assert draw.plan["mask"].int().tolist() == [[1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0],
                                                [0, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1]]


@pytest.mark.parametrize("flipped", [False, True])
def test_window_source_boxes_tile_the_crop_as_the_windows_tile_the_output(flipped):
    # crop (left, top, right, bottom) = (10, 20, 110, 70) resized to 10 x 10 px: x 10 across, x 5 down; four 5 px
    # windows tile the output, so their source boxes tile the crop, mirrored across it when the output is flipped
    boxes = window_boxes((10, 20, 110, 70), 10, torch.tensor([[0, 0], [0, 5], [5, 0], [5, 5]]), 5, flipped)
    (a, b), (c, d) = ((60, 110), (10, 60)) if flipped else ((10, 60), (60, 110))  # output columns 0-5, 5-10
    assert boxes == [((a, 20, b, 45), 0, 0), ((c, 20, d, 45), 0, 5), ((a, 45, b, 70), 5, 0), ((c, 45, d, 70), 5, 5)]


def test_windows_decoding_refuses_a_plan_without_windows(photos):
    global_mae = type("Cfg", (), {"window_size": 2, "windows": 0, "mask_ratio": 0.75})()
    masker = get_method("mae").masker(global_mae, (SIZE // 8, SIZE // 8))  # per-image noise, no windows
    base = build_pretrain_dataset(str(photos), SIZE, masker=masker)
    with pytest.raises(ValueError, match="needs a windowed method"):
        FastPretrainDataset(base, "windows", 8, 2, 1)


def test_windows_decoding_of_one_global_window_fills_the_whole_crop(photos):
    # --windows 0: the plan's one window is the whole grid, not --window-size's K (2 here): decoding K x K
    # left three quarters of every crop black
    global_lomar = type("Cfg", (), {"window_size": 2, "windows": 0, "mask_ratio": 0.75})()
    masker = get_method("lomar").masker(global_lomar, (SIZE // 8, SIZE // 8))
    base = build_pretrain_dataset(str(photos), SIZE, seed=5, masker=masker)
    windows = FastPretrainDataset(base, "windows", 8, 2, 0)
    for index in range(len(base)):
        reference, item = base[(index, 1)], windows[(index, 1)]
        assert (item["image"] - reference["image"]).abs().mean() < 0.5, index  # reduced decode: not bit for bit


def _bomb(path: Path, source: Path, height: int, width: int) -> None:
    """``source`` with its JPEG header (SOF0) claiming ``height`` x ``width``."""
    data = bytearray(source.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


def test_every_decode_path_skips_what_the_reference_path_skips(photos, tmp_path, monkeypatch):
    _jpeg(tmp_path / "a_large.jpg", 300, 400)
    _bomb(tmp_path / "b_bomb.jpg", tmp_path / "a_large.jpg", 60000, 60000)  # Pillow refuses to open it
    _jpeg(tmp_path / "c_fine.jpg", 200, 150)
    monkeypatch.setenv("LOMAR_MAX_IMAGE_PIXELS", str(100_000))  # a_large (120 000 px) is over it
    base = _base(tmp_path)
    for mode, reader in _readers(base).items():
        readable = [reader[(i, 0)]["image"] is not None or reader[(i, 0)].get("encoded") is not None
                    for i in range(len(base))]
        assert readable == [False, False, True], mode
        assert reader[(0, 0)]["size"] == SIZE  # an all-bad batch still has its shape


def test_decode_dataset_gives_the_loop_its_batches_for_every_mode(photos, monkeypatch):
    base = _base(photos)
    batch = {"images": torch.zeros(0, 3, SIZE, SIZE), "bad": []}
    for mode in ("full", "draft", "windows"):  # the loader's batches as they are
        decoding = decode_dataset(base, mode, 8, _Cfg.window_size, 1, "cpu")
        assert decoding.on_device is None and list(decoding.batches([batch], "cpu")) == [batch]
    with pytest.raises(ValueError, match="--decode gpu needs a CUDA device, but this run is on cpu"):
        decode_dataset(base, "gpu", 8, _Cfg.window_size, 1, "cpu")
    monkeypatch.setattr(device_decode, "DEVICE_DECODE_TYPES", ("cpu",))
    decoding = decode_dataset(base, "gpu", 8, _Cfg.window_size, 1, "cpu")
    encoded = decoding.collate([decoding.dataset[(i, 1)] for i in range(len(base))])
    reference = torch.stack([base[(i, 1)]["image"] for i in range(len(base))])
    for ahead in (0, 1, 2):  # decoded on the device, just in time or by the reader ahead of the loop
        (decoded,) = decoding.batches([encoded], "cpu", ahead)
        torch.testing.assert_close(decoded["images"], reference, rtol=0, atol=0)


def test_a_16_bit_photo_takes_the_reference_path_in_every_mode(tmp_path):
    Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16)).save(tmp_path / "deep.png")
    base = _base(tmp_path)
    want = base[(0, 0)]["image"]
    assert abs(float(want.mean()) - (116 / 255 - 0.45) / 0.226) < 0.2  # 30000 of 65535, not clipped to white
    for mode, reader in _readers(base).items():
        if mode != "gpu":
            assert torch.equal(reader[(0, 0)]["image"], want), mode


@pytest.mark.parametrize("size", [(999, 1001), (1000, 1000), (2001, 3001)])
def test_the_draft_decode_shrinks_by_the_scale_it_chose(tmp_path, size):
    from lomar.data.decode import decode_box_reduced  # the scale is its own business; the pixels are tested elsewhere

    height, width = size
    _jpeg(tmp_path / "odd.jpg", height, width)
    with Image.open(tmp_path / "odd.jpg") as img:
        reduced, _ = decode_box_reduced(img, (0, 0, height, width), height // 8, "photo.jpg")
        assert reduced.size == (-(-width // 8), -(-height // 8))


def test_a_cameras_mpo_photo_is_decoded_reduced_as_any_jpeg(tmp_path, monkeypatch):
    """Cameras and phones write JPEGs with a preview or gain map after the photo, which Pillow opens as MPO: draft and
    windows decoded them whole (slower than --decode full), knn's draft too; the photo's first picture is a JPEG."""
    from PIL import JpegImagePlugin

    from lomar.data.decode import load_image, load_image_reduced

    y, x = np.mgrid[0:256, 0:384]
    photo = np.stack([x % 256, (y * 3) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "camera.jpg", "MPO", save_all=True,
                                append_images=[Image.fromarray(photo[::4, ::4])], quality=90)
    with Image.open(tmp_path / "camera.jpg") as img:
        assert img.format == "MPO"
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda img, mode, size: scales.append(img.size[0] // size[0]) or draft(img, mode, size))
    base = _base(tmp_path)
    want = base[(0, 0)]["image"]
    for mode, reader in _readers(base).items():
        if mode in ("draft", "windows"):
            scales.clear()
            got = reader[(0, 0)]["image"]
            assert scales and max(scales) >= 2, mode
            filled = torch.ones(SIZE, SIZE, dtype=torch.bool)
            if mode == "windows":  # only the windows are filled in
                extent, filled[:] = 8 * _Cfg.window_size, False
                for r, c in (reader[(0, 0)]["top_left"] * 8).tolist():
                    filled[r:r + extent, c:c + extent] = True
            assert (got - want).abs()[:, filled].mean() < 0.5, mode
    scales.clear()
    reduced = load_image_reduced(tmp_path / "camera.jpg", 100)
    assert scales == [2] and reduced.shape == (3, 128, 192)
    assert (reduced.float() - load_image(tmp_path / "camera.jpg")[:, ::2, ::2].float()).abs().mean() < 20


def test_a_sideways_tiff_is_cropped_upright_by_every_decode_path(tmp_path):
    """Pillow gives a TIFF whose orientation tag says 6 its upright size at open: oriented_size turned it again, so
    --decode windows drew its box on a 256x384 frame of a 384x256 image and trained on a squashed other region."""
    from lomar.data.decode import load_image, oriented_size

    y, x = np.mgrid[0:256, 0:384]
    stored = np.stack([x % 256, (y * 3) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a quarter turn clockwise makes it upright
    Image.fromarray(stored).save(tmp_path / "scan.tif", exif=exif)
    with Image.open(tmp_path / "scan.tif") as img:
        assert oriented_size(img) == tuple(load_image(tmp_path / "scan.tif").shape[1:]) == (384, 256)
    base = _base(tmp_path)
    windows = FastPretrainDataset(base, "windows", 8, _Cfg.window_size, 1)
    for epoch in range(3):
        want, got = base[(0, epoch)]["image"], windows[(0, epoch)]
        filled = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        for r, c in (got["top_left"] * 8).tolist():
            filled[r:r + 8 * _Cfg.window_size, c:c + 8 * _Cfg.window_size] = True
        assert (got["image"] - want).abs()[:, filled].mean() < 0.05, epoch
