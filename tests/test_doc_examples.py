"""The Python examples of README.md and docs/dense.md run as written, and give the shapes their comments state;
every `lomar` command line of the documents names flags and choices its command has; the README's window
counts, demo steps and Layout are the code's.

Each block is read from the document itself, so an edit that breaks an example fails here. Only sizes are
shrunk, where the code path stays the same: ViT-Ti for ViT-B in the README, a 256 px input for the dense
page's 1024 px (its stated shapes are checked divided by 4).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import shlex
from pathlib import Path

import torch

import lomar
from helpers import write_images
from lomar.cli.app import build_parser
from lomar.cli.study.runner import check_cells
from lomar.cli.study.spec import load_spec

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


def test_readme_study_spec_is_a_study_lomar_study_runs(tmp_path) -> None:
    """The README's spec, beside the folders it names, passes the checks `lomar study` makes before any cell trains:
    its keys, every cell's pretrain settings (MAE's cells included) and each evaluation's options."""
    (block,) = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (tmp_path / "my-study.yaml").write_text(block)
    write_images(tmp_path / "images", 8)  # one step of the spec's batch_size
    for split, count in (("train", 32), ("val", 1)):  # train: one finetune step of its default batch, 64
        for label in ("cat", "dog"):
            write_images(tmp_path / "labelled" / split / label, count, size=(8, 8))
    spec = load_spec(tmp_path / "my-study.yaml")  # data: paths are the spec folder's, not the working directory's
    check_cells(spec)
    assert {c.settings.get("windows") for c in spec.cells() if not c.random_init} == {8, 4}  # a mapping sets two


DOCS = ("README.md", "docs/dense.md", "docs/multinode.md", "benchmarks/README.md")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def doc_command_lines(doc: str, names: set[str]) -> list[str]:
    """`lomar CMD ...` as written in the document's code blocks (continuation lines joined) and inline code."""
    text = (ROOT / doc).read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            found += re.findall(r"(?:^|\s)(lomar [a-z][^#'|]*)", line)
    found += re.findall(r"`(lomar [a-z][^`]*)`", re.sub(r"\s*\n\s*", " ", text))
    return [c for c in found if c.split()[1] in names]


def flag_problems(command: str, parser: argparse.ArgumentParser) -> list[str]:
    """Flags the command does not have, and values outside a flag's choices (placeholders such as DIR skipped)."""
    tokens = shlex.split(re.sub(r"\[|\]|…|\.\.\.", " ", command))[1:]
    sub, rest = _commands(parser)[tokens[0]], tokens[1:]
    nested = [a.choices for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
    if nested and rest and rest[0] in nested[0]:  # lomar tokenizer fit ...
        sub, rest = nested[0][rest[0]], rest[1:]
    options = {s: a for a in sub._actions for s in a.option_strings}
    problems = []
    for i, token in enumerate(rest):
        action = options.get(token.split("=")[0]) if token.startswith("--") else None
        if token.startswith("--") and action is None:
            problems.append(f"{token}: no such flag")
        for value in rest[i + 1:] if action is not None and action.choices else ():
            if value.startswith("-") or not re.fullmatch(r"[a-z0-9][a-z0-9_+-]*", value):
                break
            if value not in action.choices:
                problems.append(f"{token} {value}: not a choice")
            if action.nargs not in ("+", "*"):
                break
    return problems


def test_every_documented_command_line_uses_flags_and_choices_its_command_has():
    parser = build_parser()
    names = set(_commands(parser))
    lines = {doc: doc_command_lines(doc, names) for doc in DOCS}
    assert all(len(found) >= 5 for found in lines.values()), {doc: len(found) for doc, found in lines.items()}
    bad = {line: p for found in lines.values() for line in found if (p := flag_problems(line, parser))}
    assert not bad, bad
    assert flag_problems("lomar bench --methods lomar mea --precision bf32 --accum-iters 2", parser) == [
        "--methods mea: not a choice", "--precision bf32: not a choice", "--accum-iters: no such flag"]


def _readme_text() -> str:
    return re.sub(r"\s+", " ", (ROOT / "README.md").read_text())


def test_readme_window_counts_and_demo_steps_match_the_code():
    from lomar.data.demo_images import demo_image_paths
    from lomar.data.folder import build_pretrain_dataset
    from lomar.train.config import DEMO_PRESET
    from lomar.window_counts import paper_windows

    text = _readme_text()
    counts = re.search(r"(\d+) windows at 224 px, (\d+) at 448, (\d+) at 896", text)
    assert counts, "the README's windows-per-size sentence moved: update this test"
    assert [int(n) for n in counts.groups()] == [paper_windows(px, 16, 7) for px in (224, 448, 896)]
    repeats = inspect.signature(build_pretrain_dataset).parameters["demo_repeats"].default
    per_epoch = len(demo_image_paths()) * repeats // DEMO_PRESET["batch_size"]
    demo = re.search(r"trains for (\d+) steps on (\d+) px crops of (\d+) photographs", text)
    assert demo, "the README's demo sentence moved: update this test"
    assert [int(n) for n in demo.groups()] == [DEMO_PRESET["epochs"] * per_epoch, DEMO_PRESET["img_size"],
                                               len(demo_image_paths())]
    figures = [int(n) for n in re.findall(r"reconstruction-(\d{6})\.png", text)]
    assert figures[:3] == [0, DEMO_PRESET["save_every"] * per_epoch, DEMO_PRESET["epochs"] * per_epoch]


def test_readme_layout_names_every_package_and_top_level_module():
    block = re.search(r"## Layout\n+```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    source = block.split("\ntests/")[0].replace("src/lomar/", " " * len("src/lomar/"))
    # a package's entry: its folder name(s) at the start of a line, then its description
    described = {name for line in source.splitlines()
                 if (m := re.match(r"\s*((?:[a-z_]+/ )*[a-z_]+/)\s+\S", line))
                 for name in re.findall(r"([a-z_]+)/", m.group(1))}
    package = Path(lomar.__file__).parent
    subpackages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__"}
    assert described == subpackages, (subpackages - described, described - subpackages)
    assert modules - set(re.findall(r"[a-z_]+", source)) == set()


def _resolves(dotted: str) -> bool:
    """`lomar.a.b.c` is a module, or an attribute chain of the longest module prefix that imports."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(value, name):
                return False
            value = getattr(value, name)
        return True
    return False


def test_every_lomar_name_the_documents_give_imports_and_the_readme_names_every_public_one():
    """A dotted `lomar.X` name in README, docs/ or benchmarks/README.md is a module or an attribute a user can
    reach, and each name `import lomar` offers (its __all__) is named `lomar.NAME` in the README."""
    named = {m.rstrip(".") for doc in DOCS for m in re.findall(r"\blomar(?:\.[A-Za-z_]\w*)+", (ROOT / doc).read_text())}
    assert {"lomar.load_model", "lomar.sample_plan", "lomar.dense"} <= named
    assert [n for n in sorted(named) if not _resolves(n)] == []
    readme = (ROOT / "README.md").read_text()
    assert [n for n in lomar.__all__ if n != "__version__" and f"lomar.{n}" not in readme] == []
    assert not _resolves("lomar.no_such_name") and not _resolves("lomar.dense.NoSuchBackbone")
