"""A segmenter's `lomar predict --out DIR`: with --overwrite, DIR's label maps are this predict's, an earlier one's
PNGs of images not predicted now removed; without it, they join the earlier ones; a user's own files there stay."""

from __future__ import annotations

import numpy as np
from PIL import Image

from helpers import CPU_RUN, segmenter_file
from lomar.cli.app import main
from lomar.models.segmenter import UperNetSegmenter
from lomar.models.vit import VisionTransformer, ViTConfig


def _pngs(out) -> list[str]:
    return sorted(path.relative_to(out).as_posix() for path in out.rglob("*.png"))


def test_overwrite_leaves_no_label_map_of_an_image_not_predicted_again(tmp_path):
    config = ViTConfig(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2)
    segmenter_file(tmp_path / "seg.pt", UperNetSegmenter(VisionTransformer(config), 3, channels=8, aux_channels=8))
    every, few, out = tmp_path / "every", tmp_path / "few", tmp_path / "out"
    for name in ("every/a.png", "every/b.png", "every/sub/c.png", "few/a.png", "d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / name)
    predict = ["predict", str(tmp_path / "seg.pt"), "--out", str(out), *CPU_RUN]
    assert main([*predict, str(every)]) == 0
    (out / "mine.png").write_bytes(b"the user's")
    (out / "sub" / "notes.txt").write_text("the user's")
    assert main([*predict, str(tmp_path / "d.png")]) == 0  # without --overwrite: added to the earlier ones
    assert _pngs(out) == ["a.png", "b.png", "d.png", "mine.png", "sub/c.png"]
    (out / "..lomar-written.json.tmp-99999-0123456789abcdef").write_text("{")  # a killed predict's list
    assert main([*predict, str(few), "--overwrite"]) == 0
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".")) == [".lock", ".lomar-written.json"]
    assert _pngs(out) == ["a.png", "mine.png"]
    assert (out / "mine.png").read_bytes() == b"the user's" and (out / "sub" / "notes.txt").exists()


def test_overwrite_of_a_folder_without_lomars_list_says_how_many_pngs_it_left(tmp_path, capsys):
    config = ViTConfig(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2)
    segmenter_file(tmp_path / "seg.pt", UperNetSegmenter(VisionTransformer(config), 3, channels=8, aux_channels=8))
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(image := tmp_path / "a.png")
    (out := tmp_path / "out").mkdir()
    for name in ("a.png", "b.png", "c.png"):  # an earlier predict's, which kept no list, or the user's
        (out / name).write_bytes(b"?")
    assert main(["predict", str(tmp_path / "seg.pt"), str(image), "--out", str(out), "--overwrite", *CPU_RUN]) == 0
    said = capsys.readouterr().out
    assert said.rstrip().endswith(f"-> {out}; 2 other PNGs left there, which lomar cannot tell from yours ({out} held "
                                  f"no .lomar-written.json listing the ones it wrote): remove any an earlier predict "
                                  f"wrote"), said
    assert _pngs(out) == ["a.png", "b.png", "c.png"]
