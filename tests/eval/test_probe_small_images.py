"""knn and linprobe say, for each split, how many of its images are smaller than the resize (enlarged by it), as a
training run counts the images smaller than its crop."""

import numpy as np
import pytest
import torch
from PIL import Image

from lomar import VisionTransformer, ViTConfig, export_encoder
from lomar.cli.app import main


@pytest.mark.parametrize("command, extra", [("knn", ["--k", "3"]), ("linprobe", ["--epochs", "1"])])
def test_knn_and_linprobe_count_each_splits_images_smaller_than_the_resize(tmp_path, capsys, command, extra):
    torch.manual_seed(0)
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
                   tmp_path / "enc")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):  # 40 px: over the 36 px resize of 32 px crops
                Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for name, (height, width) in (("small.png", (20, 16)), ("less.png", (30, 40))):
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(tmp_path / "train" / "b" / name)
    assert main([command, str(tmp_path / "enc"), "--data", str(tmp_path), "--img-size", "32", "--workers", "0",
                 "--device", "cpu", *extra]) == 0
    said = capsys.readouterr().err
    assert (f"{tmp_path / 'train'}: 2 images smaller than the 36 px resize upscaled, the smallest 16x20 "
            f"({tmp_path / 'train' / 'b' / 'small.png'})") in said
    assert f"{tmp_path / 'val'}:" not in said  # none of its images is
