"""The Python examples of README.md and docs/dense.md run as written, and give the shapes their comments state.

Each block is read from the document itself, so an edit that breaks an example fails here. Only sizes are
shrunk, where the code path stays the same: ViT-Ti for ViT-B in the README, a 256 px input for the dense
page's 1024 px (its stated shapes are checked divided by 4).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

import lomar

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)


def run_block(code: str, doc: str) -> dict:
    namespace: dict = {}
    exec(compile(code, doc, "exec"), namespace)
    return namespace


def test_readme_python_example_runs_and_replays_its_plan() -> None:
    (block,) = python_blocks("README.md")
    assert block.count('"vit_base_patch16"') == 2
    ns = run_block(block.replace('"vit_base_patch16"', '"vit_tiny_patch16"'), "README.md")
    plan = ns["plan"]
    assert plan.top_left.shape == (2, 9, 2) and plan.mask.shape == (2, 9, 49)  # (N, n, 2) and (N, n, K*K)
    assert int(plan.mask[0, 0].sum()) == int(49 * 0.8)
    assert torch.equal(ns["loss"], ns["loss_again"])  # the same plan reproduces the loss
    assert isinstance(ns["mae"], lomar.MAE)


def test_dense_page_backbone_example_gives_the_stated_pyramid() -> None:
    (block,) = python_blocks("docs/dense.md")
    shapes = ast.literal_eval(re.search(r"^# (\{'p2'.*\})$", block, re.M).group(1))
    encoder = lomar.VisionTransformer(lomar.model_config("vit_tiny_patch16"))
    lomar.export_encoder(encoder, "export/")
    assert block.count("1024, 1024") == 1
    ns = run_block(block.replace("1024, 1024", "256, 256"), "docs/dense.md")
    got = {name: tuple(f.shape) for name, f in ns["features"].items()}
    assert got == {name: (b, c, h // 4, w // 4) for name, (b, c, h, w) in shapes.items()}
    strides = ns["backbone"].output_shape()
    assert strides["p2"] == {"channels": 256, "stride": 4}
    assert [s["stride"] for s in strides.values()] == [4, 8, 16, 32, 64]
