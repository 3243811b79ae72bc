"""Each method pretrains on its own paper's recipe: the values, their place in the resolution
order (under YAML and flags, over the generic defaults), and what the engine takes from them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from lomar.cli.app import build_parser, main
from lomar.data.transforms import PretrainTransform, draw_sample, sample_generator
from lomar.methods import get_method
from lomar.methods.base import RECIPE_KEYS

# The papers' values, written out here independently of the method modules.
PAPER = {
    # SPEC §4 (LoMaR's main_pretrain.py) = MAE's Table 8
    "lomar": dict(epochs=400, betas=(0.9, 0.95), blr=1.5e-4, lr=None, warmup_epochs=40, min_lr=0.0, weight_decay=0.05,
                  clip_grad=None, crop_scale=(0.2, 1.0), color_jitter=0.0, layer_scale_init=None),
    "mae": dict(epochs=400, betas=(0.9, 0.95), blr=1.5e-4, lr=None, warmup_epochs=40, min_lr=0.0, weight_decay=0.05,
                clip_grad=None, crop_scale=(0.2, 1.0), color_jitter=0.0, layer_scale_init=None),
    # BEIT_SPEC §4: lr 1.5e-3 at batch 2048, not scaled; layer scale by model size
    "beit": dict(epochs=800, betas=(0.9, 0.999), lr=1.5e-3, warmup_epochs=10, min_lr=1e-5, weight_decay=0.05,
                 clip_grad=3.0, crop_scale=(0.08, 1.0), color_jitter=0.4, layer_scale_init=None),
}


def _config(tmp_path: Path, capsys, *args: str) -> dict:
    assert main(["pretrain", "--out", str(tmp_path / "run"), *args, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("method", sorted(PAPER))
def test_each_method_carries_its_papers_recipe(method):
    recipe = get_method(method).recipe
    assert set(recipe) == set(RECIPE_KEYS)
    for key, value in PAPER[method].items():
        assert recipe[key] == value, (method, key)
    # one declaration serves every run of the process: it cannot be changed in place
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_method(method).recipe = {}


@pytest.mark.parametrize("method", sorted(PAPER))
def test_print_config_shows_the_methods_recipe(method, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    resolved = _config(tmp_path, capsys, "--method", method, "--data", str(tmp_path / "data"))
    for key, value in PAPER[method].items():
        shown = tuple(resolved[key]) if isinstance(value, tuple) else resolved[key]
        if key == "layer_scale_init" and method == "beit":
            value = 0.1  # ViT-B
        assert shown == value, (method, key)


def test_beit_print_config_without_data_shows_beits_recipe(tmp_path, capsys):
    # the demo preset sizes the run (lr, warm-up) but keeps the recipe's optimizer and augmentation
    out = main(["pretrain", "--out", str(tmp_path / "run"), "--method", "beit", "--print-config"])
    text = capsys.readouterr().out
    resolved = yaml.safe_load(text)
    assert out == 0 and "BEiT's pretraining recipe" in text
    assert tuple(resolved["betas"]) == (0.9, 0.999) and resolved["clip_grad"] == 3.0 and resolved["min_lr"] == 1e-5
    assert tuple(resolved["crop_scale"]) == (0.08, 1.0) and resolved["color_jitter"] == 0.4


def test_layer_scale_follows_the_model_size(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data = ("--data", str(tmp_path / "data"))
    assert _config(tmp_path, capsys, "--method", "beit", "--model", "vit_large_patch16", *data)[
        "layer_scale_init"] == 1e-5
    assert _config(tmp_path, capsys, "--method", "beit", "--model", "vit_small_patch16", *data)[
        "layer_scale_init"] == 0.1


def test_flags_and_yaml_override_the_recipe(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("clip_grad: 1.0\nbetas: [0.8, 0.99]\n")
    resolved = _config(tmp_path, capsys, "--method", "beit", "--data", str(tmp_path / "data"), "--config",
                       str(yaml_file), "--crop-scale", "0.3", "1.0", "--color-jitter", "0")
    assert resolved["clip_grad"] == 1.0 and tuple(resolved["betas"]) == (0.8, 0.99)
    assert tuple(resolved["crop_scale"]) == (0.3, 1.0) and resolved["color_jitter"] == 0
    # a given base lr scales with the batch: BEiT's absolute lr gives way to it
    resolved = _config(tmp_path, capsys, "--method", "beit", "--data", str(tmp_path / "data"), "--blr", "1e-4")
    assert resolved["lr"] is None and resolved["blr"] == 1e-4


@pytest.mark.parametrize("args, words", [
    (["--crop-scale", "0.9", "0.5"], ["--crop-scale", "0.9 0.5"]),
    (["--color-jitter", "0.4", "--decode", "draft"], ["--color-jitter", "--decode full"]),
    (["--layer-scale-init", "0.1"], ["--layer-scale-init", "beit only"]),
    (["--betas", "0.9", "1.0"], ["--betas"]),
])
def test_bad_recipe_settings_are_refused(args, words, tmp_path, capsys):
    try:
        code = main(["pretrain", "--out", str(tmp_path / "run"), *args, "--print-config"])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    for word in words:
        assert word in err


def test_jitter_off_draws_what_it_drew_before_and_on_changes_colours():
    image = (torch.rand(3, 40, 50) * 255).to(torch.uint8)
    plain, jitter = PretrainTransform(32, (0.2, 1.0)), PretrainTransform(32, (0.2, 1.0), color_jitter=0.4)
    a = draw_sample(plain, None, 40, 50, sample_generator(0, 0, 3))
    b = draw_sample(jitter, None, 40, 50, sample_generator(0, 0, 3))
    assert a.jitter == () and (a.box, a.flip) == (b.box, b.flip)  # jitter is drawn last
    assert sorted(op for op, _ in b.jitter) == ["brightness", "contrast", "saturation"]
    assert all(0.6 <= f <= 1.4 for _, f in b.jitter)
    assert not torch.equal(plain.apply(image, a), jitter.apply(image, b))


def test_crop_scale_reaches_the_crop():
    transform = PretrainTransform(32, (0.08, 0.1))
    for i in range(50):
        _, _, h, w = transform.crop_box(100, 100, sample_generator(0, 0, i))
        assert h * w <= 0.13 * 100 * 100  # rounding of h and w


def _quoted(help_text: str, method: str, methods: tuple[str, ...]) -> str | None:
    """The value a pretrain help writes out for ``method``: "lomar, mae: 400; beit: 800" -> "400" for mae;
    "the --method's recipe: 0.05" (one value for every method) -> "0.05"; None where it says nothing of it."""
    names = "|".join(methods)
    per_method = re.findall(rf"((?:(?:{names}), )*(?:{names})): ([^;)]+)", help_text)
    for group, value in per_method:
        if method in group.split(", "):
            return value.split(",")[0].strip()
    shared = None if per_method else re.search(r"recipe: ([^;)]+)", help_text)
    return shared.group(1).strip() if shared else None


def _written(value) -> str:
    return " ".join(_written(v) for v in value) if isinstance(value, tuple) else f"{value:g}"


def _numbers(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.split()]
    except ValueError:
        return None


def help_drift(helps: dict[str, str], methods: dict) -> list[str]:
    """Where a pretrain help's written-out value differs from a method's recipe (``methods``: name -> Method)."""
    unset = {"clip_grad": "no clipping", "lr": "from --blr"}  # what a help says for a recipe's None
    wrong = []
    for name, method in methods.items():
        for key in sorted(set(RECIPE_KEYS) - {"layer_scale_init"}):
            value, quoted = method.recipe[key], _quoted(helps[key], name, tuple(methods))
            if quoted is None:  # a help that names no value for this method claims none
                continue
            expected = unset[key] if value is None else _written(value)
            if quoted != expected and (value is None or _numbers(quoted) != _numbers(expected)):
                wrong.append(f"--{key.replace('_', '-')} {name}: help says {quoted!r}, recipe {value!r}")
        ratio = method.default_mask_ratio
        if ratio is not None and f"{ratio:g} {name}" not in helps["mask_ratio"]:
            wrong.append(f"--mask-ratio {name}: help {helps['mask_ratio']!r} lacks {ratio:g}")
    return wrong


def test_the_pretrain_help_quotes_each_methods_own_recipe():
    """The pretrain help writes each method's recipe out (--help imports no method module: that would import
    torch), so a recipe changed in its method module must change the help too."""
    from lomar.methods import names

    parser = build_parser(["pretrain"]).commands["pretrain"]
    helps = {a.dest: a.help for a in parser._actions}
    methods = {name: get_method(name) for name in names()}
    assert help_drift(helps, methods) == []
    # the parse finds what the helps say: every recipe value for lomar, and beit's own
    assert all(_quoted(helps[key], "lomar", tuple(methods)) for key in set(RECIPE_KEYS) - {"layer_scale_init"})
    assert _quoted(helps["epochs"], "beit", tuple(methods)) == "800"
    beit = methods["beit"]
    drifted = {**methods, "beit": dataclasses.replace(beit, recipe={**beit.recipe, "min_lr": 2e-5},
                                                      default_mask_ratio=0.5)}
    assert help_drift(helps, drifted) == ["--min-lr beit: help says '1e-5', recipe 2e-05",
                                          "--mask-ratio beit: help " + repr(helps["mask_ratio"]) + " lacks 0.5"]
