"""`lomar tokenizer fit --max-images N` fits on N images drawn across the whole folder, read one at a
time: a folder is listed sorted, so its first N images are its first classes (ImageNet's first 2048
are tench and goldfish), and holding every view besides its patches doubled the memory."""

from pathlib import Path

import numpy as np
from PIL import Image

from lomar.cli import tokenizer as tokenizer_cli
from lomar.cli.app import main


def _folder(root: Path, classes: int = 3, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def _recording_loads(monkeypatch) -> list[Path]:
    import lomar.data.decode as decode

    loaded, real = [], decode.load_image
    monkeypatch.setattr(decode, "load_image", lambda path: loaded.append(Path(path)) or real(path))
    return loaded


def test_max_images_are_drawn_across_the_folder_not_its_first_classes(tmp_path, monkeypatch, capsys):
    data = _folder(tmp_path / "data")
    loaded = _recording_loads(monkeypatch)
    args = ["tokenizer", "fit", "--data", str(data), "--vocab", "2", "--size", "8", "--max-images", "3"]
    assert main([*args, "--out", str(tmp_path / "a.safetensors")]) == 0
    first = list(loaded)
    assert len(set(first)) == 3 and {p.parent.name for p in first} != {"c0"}, first
    out = capsys.readouterr().out
    assert "3 images" in out and "lomar tokenizer fit: k-means iteration 1/20: 3 of 3 patches changed token (" in out
    loaded.clear()  # the same seed draws the same images
    assert main([*args, "--out", str(tmp_path / "b.safetensors")]) == 0
    assert loaded == first


def test_views_are_read_one_at_a_time(tmp_path, monkeypatch):
    loaded = _recording_loads(monkeypatch)
    data = str(_folder(tmp_path / "data"))
    views = tokenizer_cli._views(tokenizer_cli._image_paths(data, 9, 0), data, 8, {})
    assert tuple(next(views).shape) == (3, 8, 8) and len(loaded) == 1


def test_views_given_one_at_a_time_are_turned_into_patches_in_groups(monkeypatch):
    """Image by image, a busy CPU's thread pool took 4x as long over the small operations (2048 views of 112 px:
    7 s against 1.8 s batched); the groups give the same features."""
    import torch

    from lomar.tokenizers import kmeans

    calls, real = [], kmeans.patch_features
    monkeypatch.setattr(kmeans, "patch_features", lambda x, p: calls.append(x.shape[0]) or real(x, p))
    views = torch.rand(67, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grouped = kmeans._gather_features(iter(views), 8, 16)
    assert sum(calls) == 67 and len(calls) <= 2, calls
    assert torch.equal(grouped, real(views, 8).flatten(0, 1))


def test_the_fit_runs_on_device_and_a_missing_one_is_one_line(tmp_path, monkeypatch, capsys):
    """The k-means iterations ran on the CPU whatever the machine (the default's 20 take about 13 minutes on 2
    cores); the seeded draws stay on the CPU, so a device changes only the float sums."""
    import torch

    from lomar.tokenizers import fit_kmeans_tokenizer, kmeans

    views = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    devices, nearest = [], kmeans._nearest
    monkeypatch.setattr(kmeans, "_nearest", lambda x, c: devices.append((x.device, c.device)) or nearest(x, c))
    fitted = fit_kmeans_tokenizer(views, vocab_size=3, input_size=16, iters=2, device="cpu")
    assert fitted.centroids.device.type == "cpu" and set(devices) == {(torch.device("cpu"),) * 2}
    assert torch.equal(fitted.centroids, fit_kmeans_tokenizer(views, vocab_size=3, input_size=16, iters=2).centroids)

    data = _folder(tmp_path / "data")
    args = ["tokenizer", "fit", "--data", str(data), "--vocab", "2", "--size", "8", "--out",
            str(tmp_path / "t.safetensors")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*args, "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("lomar tokenizer fit: error: --device cuda: CUDA is not available on this "
                                       "machine; pass --device cpu\n")
    assert main([*args, "--device", "auto"]) == 0
    assert "at 8 px on cpu" in capsys.readouterr().out


def _class_shards(root: Path, shards: int = 16, per_shard: int = 64) -> str:
    """Shards written class by class, one class each, as ImageNet's often are."""
    import io
    import tarfile

    root.mkdir()
    for s in range(shards):
        encoded = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), s * 15, np.uint8)).save(encoded, "PNG")
        with tarfile.open(root / f"shard-{s:02d}.tar", "w") as archive:
            for i in range(per_shard):
                info = tarfile.TarInfo(f"class{s:02d}_{i:03d}.png")
                info.size = len(encoded.getvalue())
                archive.addfile(info, io.BytesIO(encoded.getvalue()))
    return str(root / f"shard-{{00..{shards - 1:02d}}}.tar")


def test_the_built_in_tokenizer_is_fitted_on_samples_drawn_across_all_shards_alike_in_every_process(
        tmp_path, monkeypatch):
    """Its fit sample was the shard stream's first crops, from the one or two shards the shuffle buffer had filled
    from: 64 crops of 1 class of 128 shards of 1,000, one class each. And the stream is dealt by rank, so under
    torchrun each process fitted a tokenizer of its own and trained against it (rank 0's saved and recorded)."""
    import torch

    import lomar.data.shards as shards
    from lomar.methods import beit
    from lomar.train.config import PretrainConfig

    config = PretrainConfig(data=_class_shards(tmp_path / "shards"), img_size=16, method="beit")
    decoded, real = [], shards.decode_bytes
    monkeypatch.setattr(shards, "decode_bytes", lambda data, name: decoded.append(name) or real(data, name))
    alone = beit._sample_views(config, 16, 16)
    assert len({name.rsplit(":", 1)[1][:7] for name in decoded}) == 16, decoded  # every class
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # the second of two processes
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert torch.equal(beit._sample_views(config, 16, 16), alone)


def test_shards_the_tokenizers_draw_read_whole_are_counted_without_reading_them_again(tmp_path, monkeypatch, caplog):
    """The run's count read every header again after the draw had: ~90 s more for one tar of ImageNet's 1.28M. A
    shard changed since, or counted once already (loader workers fork after), is read again."""
    import collections
    import io
    import logging
    import os
    import tarfile

    from lomar.data.shards import TarShardDataset
    from lomar.data.transforms import PretrainTransform

    _class_shards(tmp_path / "shards", shards=3, per_shard=8)
    paths = sorted((tmp_path / "shards").glob("*.tar"))
    with tarfile.open(paths[0], "a") as archive:  # a NAS's thumbnail: passed over, and said by the count
        info = tarfile.TarInfo("@eaDir/class00_000.png/THUMB.png")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    fresh = TarShardDataset(paths, PretrainTransform(16))
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        expected = fresh.count_samples(), fresh.counts, caplog.text
    caplog.clear()
    opened, real = collections.Counter(), tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda name, *a, **k: opened.update([Path(name).name]) or real(name, *a, **k))
    assert len(list(TarShardDataset(paths, PretrainTransform(16)).spread(3))) == 3  # one member from each shard
    os.utime(paths[2], ns=(1, 1))  # changed since the draw
    counted = TarShardDataset(paths, PretrainTransform(16))
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert (counted.count_samples(), counted.counts, caplog.text) == expected
    assert opened == {paths[0].name: 1, paths[1].name: 1, paths[2].name: 2}  # not each twice: a count is kept
    counted.count_samples()
    assert opened == {paths[0].name: 2, paths[1].name: 2, paths[2].name: 3}


def test_under_torchrun_one_process_a_machine_says_it_fits_the_built_in_tokenizer(image_dir, monkeypatch, capsys):
    """Every process fits it (the same one, without waiting for the main one's file), and each printed the line."""
    from lomar.methods import beit
    from lomar.train.config import PretrainConfig

    config = PretrainConfig(data=str(image_dir), img_size=16, method="beit")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for local_rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert beit.fit_on_training_images(config, (1, 1), count=8).vocab_size == 2
        assert capsys.readouterr().out.count("fitting the built-in k-means tokenizer") == lines


def test_under_torchrun_the_first_process_fits_the_built_in_tokenizer_and_sends_it_to_the_others(
        image_dir, monkeypatch):
    """Each process fitted its own from the same sample: on machines whose CPUs round a tie another way, a process
    would train against other targets than the saved tokenizer's. The first fits; the others read no image."""
    import pytest
    import torch

    from lomar.methods import beit
    from lomar.train.config import PretrainConfig

    dist, rank, sent = torch.distributed, [0], []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank[0])
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: sent.append(tensor.clone()) if rank[0] == src
                        else tensor.copy_(sent.pop(0)))
    config = PretrainConfig(data=str(image_dir), img_size=16, method="beit")
    first = beit.fit_on_training_images(config, (1, 1), count=8)
    assert [tuple(t.shape) for t in sent] == [(2,), tuple(first.centroids.shape)]
    rank[0] = 1
    monkeypatch.setattr(beit, "_sample_views", lambda *a: pytest.fail("the second process read training images"))
    second = beit.fit_on_training_images(config, (1, 1), count=8)
    assert torch.equal(second.centroids, first.centroids) and second.input_size == first.input_size == 8
    assert not sent


def test_under_torchrun_the_other_processes_read_the_shards_headers_while_the_first_fits(tmp_path, monkeypatch):
    """They waited for the first process's tokenizer, then read every header to count the shards: for one tar of
    ImageNet ~90 s after the first's draw had read them, not beside it."""
    import collections
    import tarfile

    import torch

    from lomar.data.shards import TarShardDataset
    from lomar.data.transforms import PretrainTransform
    from lomar.methods import beit
    from lomar.train.config import PretrainConfig

    dist, sent = torch.distributed, [torch.tensor([2, 192]), torch.rand(2, 192)]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: tensor.copy_(sent.pop(0)))
    config = PretrainConfig(data=_class_shards(tmp_path / "shards", shards=2, per_shard=4), img_size=16, method="beit")
    beit.fit_on_training_images(config, (1, 1), count=8)
    opened, real = collections.Counter(), tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda name, *a, **k: opened.update([Path(name).name]) or real(name, *a, **k))
    dataset = TarShardDataset(sorted((tmp_path / "shards").glob("*.tar")), PretrainTransform(16))
    assert dataset.count_samples() == 8 and not opened  # neither shard read again


def test_the_built_in_tokenizers_fit_says_the_unreadable_images_it_passed_over(tmp_path, monkeypatch, capsys):
    """An unreadable file drawn for the fit was passed over without a word: the line said '8 training crops' of a
    folder of 9 files, where pretraining names the images it skips. The crops' size is the run's, which the tokenizer
    reads at its own (8 px a token, one per patch): '8 training crops at 8 px' read as a run of 8 px images."""
    from lomar.methods import beit
    from lomar.train.config import PretrainConfig

    data = _folder(tmp_path / "data")
    broken = data / "c1" / "1.png"
    broken.write_bytes(b"")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    beit.fit_on_training_images(PretrainConfig(data=str(data), img_size=16, method="beit"), (1, 1), count=9)
    line = next(line for line in capsys.readouterr().out.splitlines() if "k-means tokenizer" in line)
    assert f"8 training crops of 16 px, which the tokenizer reads at 8 px; 1 unusable image(s) skipped, e.g. " \
           f"{broken})" in line, line
