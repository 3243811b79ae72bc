"""What `pip install lomar` gets: the declared dependencies against the imports, their lower bounds, the
licence metadata, and (slow) the sdist and wheel that setuptools builds from this tree."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lomar"
# The import name where it is not the distribution's.
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image", "sklearn": "scikit-learn"}
# Used without an `import` of its own: torch.utils.tensorboard needs it.
USED_THROUGH = {"tensorboard": "torch.utils.tensorboard"}
# The oldest release of each with what lomar calls; an older one installs and then fails.
FLOORS = {
    "torch": ((2, 6), "`from torch.distributed.fsdp import fully_shard` (--fsdp); in _composable before"),
    "torchvision": ((0, 21), "the release built for torch 2.6"),
    "timm": ((1, 0, 29), "`local-dir:` on a folder with two .safetensors files (a BEiT run folder): NameError before; "
                         "global_pool_nlc, Beit's checkpoint_filter_fn, timm.optim.param_groups_layer_decay: 1.0.16"),
    "pillow": ((11,), "a PNG's eXIf chunk before its pixels read at open (the size turned upright unread: 10.4 "
                      "fails test_a_pngs_exif_before_its_pixels...); 16-bit PNGs opened as I;16 (10.0, 10.1)"),
    # numpy>=1.24 admits numpy 2, under which older builds of these fail to import ("numpy.dtype size changed",
    # "numpy.core.multiarray failed to import"); checked on numpy 2.4: 2.0.7, 3.7.5, 0.21.0, 1.3.2 fail.
    "pycocotools": ((2, 0, 8), "numpy 2"),
    "matplotlib": ((3, 8, 4), "numpy 2"),
    "scikit-image": ((0, 23, 2), "numpy 2 (`import skimage`, which the demo's photographs need)"),
    "scikit-learn": ((1, 4, 2), "numpy 2"),
}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(spec: str) -> tuple[str, tuple[int, ...] | None]:
    """``name>=1.2,<=3`` -> ("name", (1, 2)); no lower bound -> None."""
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group().lower()
    floor = re.search(r">=\s*([0-9.]+)", spec)
    return name, tuple(int(part) for part in floor.group(1).split(".")) if floor else None


def third_party_imports() -> dict[str, Path]:
    """Top-level module -> a file that imports it, over every import in src/lomar (lazy ones included)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "lomar":
                    found.setdefault(top, path)
    return found


def test_every_import_is_a_declared_dependency_and_every_dependency_is_used() -> None:
    meta = project()["project"]
    required = {requirement(spec)[0] for spec in meta["dependencies"]}
    optional = {requirement(spec)[0] for specs in meta["optional-dependencies"].values() for spec in specs}
    imported = third_party_imports()
    undeclared = {top: str(path.relative_to(ROOT)) for top, path in imported.items()
                  if DISTRIBUTION.get(top, top).lower() not in required
                  and not (top == "nvidia" and any(name.startswith("nvidia-") for name in optional))}
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    source = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))
    used = {DISTRIBUTION.get(top, top).lower() for top in imported}
    unused = {name for name in required - used if USED_THROUGH.get(name, "\0") not in source}
    assert not unused, f"declared but never imported: {unused}"


def test_lower_bounds_leave_out_the_releases_that_lack_what_lomar_calls() -> None:
    floors = dict(requirement(spec) for spec in project()["project"]["dependencies"])
    for name, (oldest, why) in FLOORS.items():
        assert floors.get(name) is not None and floors[name] >= oldest, (
            f"{name}>={'.'.join(map(str, oldest))} at least ({why}); pyproject.toml has {floors.get(name)}")


def test_the_licence_is_an_spdx_expression_with_its_file() -> None:
    """setuptools deprecates `license = { text = ... }` (builds fail after 2027-02-18); the expression needs 77."""
    data = project()
    assert data["project"]["license"] == "Apache-2.0"
    assert data["project"]["license-files"] == ["LICENSE"]
    backend = dict(requirement(spec) for spec in data["build-system"]["requires"])
    assert backend["setuptools"] >= (77,)


@pytest.mark.slow
def test_the_built_wheel_holds_the_package_only_and_the_sdist_its_tests(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", minversion="77")
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".*")
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile"):
        shutil.copy2(ROOT / name, tree / name)
    for folder in ("src", "tests", "docs", "tools", "benchmarks"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=skip)
    out = tmp_path / "dist"
    build = "import setuptools.build_meta as b, sys; out = sys.argv[1]; b.build_sdist(out); b.build_wheel(out)"
    result = subprocess.run([sys.executable, "-c", build, str(out)], cwd=tree, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")

    names = zipfile.ZipFile(wheel).namelist()
    info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
    assert {name.split("/")[0] for name in names} == {"lomar", info}  # no tests, runs or build outputs
    assert {name for name in names if name.startswith("lomar/")} == {
        path.relative_to(tree / "src").as_posix() for path in (tree / "src" / "lomar").rglob("*.py")}
    assert f"{info}/licenses/LICENSE" in names
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "lomar = lomar.cli:run" in archive.read(f"{info}/entry_points.txt").decode()

    with tarfile.open(sdist) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for folder in ("tests", "docs", "tools", "benchmarks"):
        missing = {path.relative_to(tree).as_posix() for path in (tree / folder).rglob("*") if path.is_file()} - shipped
        assert not missing, f"not in the sdist: {sorted(missing)[:5]}"
    assert {"LICENSE", "README.md", "pyproject.toml", "Makefile"} <= shipped
