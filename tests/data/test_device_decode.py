"""--decode gpu's data path (EncodedPretrainDataset -> collate_encoded -> decode_batch), run on CPU:
the same crops, flips and plans as the reference path, and on CPU the same pixels."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lomar.data import device_decode
from lomar.data.device_decode import EncodedPretrainDataset, collate_encoded, decode_batch, decode_dataset
from lomar.data.fast_decode import FastPretrainDataset
from lomar.data.folder import build_pretrain_dataset
from lomar.methods import get_method

CPU = torch.device("cpu")


def _photo(seed: int, size=(150, 220)) -> np.ndarray:
    """A smooth picture with edges (JPEG-friendly, and a crop/flip mistake shows)."""
    y, x = np.mgrid[0:size[0], 0:size[1]]
    rng = np.random.RandomState(seed)
    a, b = rng.randint(1, 5, size=2)
    pixels = np.stack([(x * a) % 256, (y * b) % 256, ((x + y) * 3 + 60 * seed) % 256], -1)
    return pixels.astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(5):
        Image.fromarray(_photo(i)).save(root / f"photo{i}.jpg", quality=90)
    Image.fromarray(_photo(5)).save(root / "lossless.png")  # not a JPEG: decoded by the worker
    Image.fromarray(_photo(6)).convert("CMYK").save(root / "cmyk.jpg")  # a JPEG the device decoder refuses
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # unreadable header
    return root


def _datasets(root: Path, size: int = 64):
    masker = get_method("lomar").masker(_Cfg(), (size // 8, size // 8))
    base = build_pretrain_dataset(str(root), size, seed=3, masker=masker)
    return base, EncodedPretrainDataset(base)


class _Cfg:  # the settings the LoMaR masker reads
    window_size, windows, mask_ratio = 4, 2, 0.75


def test_items_draw_the_reference_crop_flip_and_plan(photos):
    base, encoded = _datasets(photos)
    kinds = {}
    for i in range(len(base)):
        ref, item = base[(i, 1)], encoded[(i, 1)]
        name = Path(item["path"]).name
        kinds[name] = "bad" if item["image"] is None and item["encoded"] is None else (
            "device" if item["encoded"] is not None else "worker")
        if kinds[name] == "bad":
            assert ref["image"] is None
            continue
        torch.testing.assert_close(item["top_left"], ref["top_left"], rtol=0, atol=0)
        torch.testing.assert_close(item["mask"], ref["mask"], rtol=0, atol=0)
    assert kinds == {**{f"photo{i}.jpg": "device" for i in range(5)}, "lossless.png": "worker",
                     "cmyk.jpg": "worker", "broken.jpg": "bad"}


def test_decoded_batch_equals_the_reference_pixels_on_cpu(photos):
    base, encoded = _datasets(photos)
    keys = [(i, 2) for i in range(len(base))]
    batch = decode_batch(collate_encoded([encoded[k] for k in keys]), CPU, base.transform)
    refs = [base[k] for k in keys]
    good = [r for r in refs if r["image"] is not None]
    assert batch["images"].shape == (len(good), 3, 64, 64)
    assert batch["bad"] == [r["path"] for r in refs if r["image"] is None]
    assert batch["paths"] == [r["path"] for r in good]
    # torchvision's CPU JPEG decoder and the reference transform's resize: identical pixels.
    torch.testing.assert_close(batch["images"], torch.stack([r["image"] for r in good]), rtol=0, atol=0)
    torch.testing.assert_close(batch["top_left"], torch.stack([r["top_left"] for r in good]), rtol=0, atol=0)
    assert "encoded" not in batch and "boxes" not in batch


def test_a_batch_is_normalised_in_one_call_not_one_per_photo(photos, monkeypatch):
    """The decode-ahead thread shares the device with the step: normalising each photo alone would cost
    four launches and two host-to-device copies (the mean and std) per photo."""
    base, encoded = _datasets(photos)
    collated = collate_encoded([encoded[(i, 2)] for i in range(len(base))])
    calls = []
    normalize = base.transform.normalize
    monkeypatch.setattr(base.transform, "normalize", lambda pixels: calls.append(pixels.shape) or normalize(pixels))
    batch = decode_batch(collated, CPU, base.transform)
    assert calls == [(5, 3, 64, 64)]  # the five device rows; the worker's rows came normalised
    assert batch["images"].shape == (7, 3, 64, 64)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the device's own JPEG decoder (nvjpeg)"))])
def test_a_file_the_decoder_refuses_leaves_the_batch(photos, tmp_path, device):
    """A truncated JPEG is refused and said. On CUDA the decoder is nvjpeg (through torchvision), whose pixels may
    differ from libjpeg's by a level or two. A camera's MPO file (its photo a JPEG, a preview after it) is left to the
    workers (the device gets JPEGs alone) and joins the batch as they decoded it."""
    data = (photos / "photo0.jpg").read_bytes()
    (tmp_path / "good.jpg").write_bytes(data)
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 3])  # header intact, scan data cut
    (tmp_path / "zgood.jpg").write_bytes((photos / "photo1.jpg").read_bytes())
    photo = _photo(7, (160, 240))
    Image.fromarray(photo).save(tmp_path / "zmpo.jpg", "MPO", save_all=True,
                                append_images=[Image.fromarray(photo[::4, ::4])], quality=90)
    base, encoded = _datasets(tmp_path)
    items = [encoded[(i, 0)] for i in range(4)]
    # the header parses: the device gets it
    assert [item["encoded"] is not None for item in items] == [True, True, True, False]
    batch = decode_batch(collate_encoded(items), torch.device(device), base.transform)
    assert [Path(p).name for p in batch["bad"]] == ["truncated.jpg"]
    # said as the reference path says it (pretrain's warning and final error read "why"): the reason, under its path
    assert list(batch["why"]) == [str(tmp_path / "truncated.jpg")]
    (why,) = batch["why"].values()
    assert "refused" in why and "cannot decode image" not in why
    assert ".cpp:" not in why and "\n" not in why
    assert [Path(p).name for p in batch["paths"]] == ["good.jpg", "zgood.jpg", "zmpo.jpg"]
    assert batch["images"].shape[0] == batch["top_left"].shape[0] == batch["mask"].shape[0] == 3
    assert batch["images"].device.type == device
    decoded, want = batch["images"][1].cpu(), base[(2, 0)]["image"]
    if device == "cpu":  # torchvision's CPU decoder is libjpeg, the reference path's
        torch.testing.assert_close(decoded, want, rtol=0, atol=0)
    else:  # nvjpeg upsamples chroma otherwise: tens of levels at hard colour edges; a wrong crop or flip moves the mean
        assert float((decoded - want).abs().mean()) < 0.05  # normalised units: a level of 255 is 0.017 of them
    torch.testing.assert_close(batch["images"][2].cpu(), base[(3, 0)]["image"], rtol=0, atol=0)


def test_all_bad_batch_is_empty(photos):
    base, encoded = _datasets(photos)
    broken = next(i for i in range(len(base)) if base.paths[i].name == "broken.jpg")
    batch = decode_batch(collate_encoded([encoded[(broken, 0)]]), CPU, base.transform)
    assert batch["images"].shape[0] == 0 and len(batch["bad"]) == 1


def test_decode_dataset_picks_the_reader(photos):
    base, _ = _datasets(photos)
    assert decode_dataset(base, "full", 8, 4, 2)[0] is base
    assert isinstance(decode_dataset(base, "draft", 8, 4, 2)[0], FastPretrainDataset)
    assert isinstance(decode_dataset(base, "windows", 8, 4, 2)[0], FastPretrainDataset)
    assert isinstance(decode_dataset(base, "gpu", 8, 4, 2)[0], EncodedPretrainDataset)
    with pytest.raises(ValueError, match="tar shards"):
        decode_dataset(object(), "draft", 8, 4, 2)


def _live_readers() -> list:
    return [t for t in threading.enumerate() if t.name == "lomar-decode-ahead"]


def test_decoded_ahead_keeps_the_order_and_works_one_batch_ahead():
    seen, second_started = [], threading.Event()

    def on_device(batch):
        seen.append(batch["i"])
        if batch["i"] == 1:
            second_started.set()
        return {**batch, "decoded": True}

    out = []
    for batch in device_decode.decoded_ahead([{"i": i} for i in range(5)], on_device, "cpu"):
        if batch["i"] == 0:  # batch 1 is decoded while the caller still holds batch 0
            assert second_started.wait(timeout=60)
        out.append(batch)
    assert [b["i"] for b in out] == seen == list(range(5)) and all(b["decoded"] for b in out)
    assert not _live_readers()


def test_decoded_ahead_raises_an_error_where_its_batch_would_be():
    def on_device(batch):
        if batch["i"] == 2:
            raise RuntimeError("unreadable batch 2")
        return batch

    got = []
    with pytest.raises(RuntimeError, match="unreadable batch 2"):
        for batch in device_decode.decoded_ahead([{"i": i} for i in range(5)], on_device, "cpu"):
            got.append(batch["i"])
    assert got == [0, 1] and not _live_readers()


def test_leaving_early_stops_the_reader_before_the_loader_is_read_again():
    reads = []

    def loader():
        for i in range(100):
            reads.append(i)
            yield {"i": i}

    batches = device_decode.decoded_ahead(loader(), lambda batch: batch, "cpu")
    for batch in batches:
        if batch["i"] == 3:
            break
    batches.close()
    assert not _live_readers() and len(reads) <= 3 + 3  # the batch taken, one queued, one in hand
