"""Crafted tokenizer files: each is refused in one line naming the file, before any model is
built at a size the file only claims; the fit request is bounded before any image is read."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lomar.cli.app import main
from lomar.tokenizers import DVAEConfig, DVAEEncoder, KMeansTokenizer, load_tokenizer
from lomar.tokenizers import dvae as dvae_module
from lomar.tokenizers.base import FORMAT_KEY

SRC = Path(__file__).resolve().parents[2] / "src"


def _zero_byte_state(width: int) -> dict[str, torch.Tensor]:
    """The keys of a small encoder, every tensor empty; the input and output convolutions claim
    ``width`` output channels (n_hid and the vocabulary are read from those two shapes)."""
    keys = DVAEEncoder(DVAEConfig(n_hid=16, n_blk_per_group=1, vocab_size=64)).state_dict()
    state = {k: torch.zeros(0) for k in keys}
    state["blocks.input.w"] = torch.zeros(width, 3, 7, 0)
    state["blocks.output.conv.w"] = torch.zeros(width, width * 8, 1, 0)
    return state


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={FORMAT_KEY: dvae_module.FORMAT})
    else:
        torch.save({"model": state}, path)
    return path


@pytest.fixture
def built(monkeypatch):
    """The device of every convolution the dVAE code builds ("meta" ones hold no memory)."""
    devices = []
    real = dvae_module.Conv.__init__

    def init(self, *args, **kwargs):
        devices.append(torch.get_default_device().type)
        real(self, *args, **kwargs)
    monkeypatch.setattr(dvae_module.Conv, "__init__", init)
    return devices


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("width, why", [
    (4096, r"does not fit the dVAE encoder .* wrong shape or dtype \['blocks\.group_1"),  # a 38 GB model
    (2**20, r"DVAEConfig.n_hid=1048576 must be an integer in \[1, 4096\]"),  # beyond any sane encoder
])
def test_zero_byte_tensors_claiming_huge_widths_build_nothing(tmp_path, built, suffix, width, why):
    path = _write(_zero_byte_state(width), tmp_path / f"evil{suffix}")
    assert path.stat().st_size < 100_000
    built.clear()  # the small encoder whose keys the file copies
    with pytest.raises(ValueError, match=why) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert set(built) <= {"meta"}, built


def test_a_real_encoder_still_loads_and_is_built_once(tmp_path, built):
    model = DVAEEncoder(DVAEConfig(n_hid=16, n_blk_per_group=1, vocab_size=64))
    built.clear()
    loaded = load_tokenizer(_write(model.state_dict(), tmp_path / "ok.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert built.count("cpu") == built.count("meta") > 0  # the skeleton, then the model


KMEANS = {  # file name -> (metadata changes, centroids, the refusal)
    "patch0": ({"patch": "0"}, None, "metadata patch='0' is not a positive whole number"),
    "patch-negative": ({"patch": "-8"}, None, "metadata patch='-8' is not a positive whole number"),
    "patch-text": ({"patch": "eight"}, None, "metadata patch='eight' is not a positive whole number"),
    # a digit to str.isdigit, not to int(): "invalid literal for int()", naming neither the file nor the fix
    "patch-superscript": ({"patch": "8²"}, None, "metadata patch='8²' is not a positive whole number"),
    "no-patch": ({"patch": None}, None, "metadata patch is missing"),
    "no-input-size": ({"input_size": None}, None, "metadata input_size is missing"),
    "no-vocab": ({"vocab_size": None}, None, "metadata vocab_size is missing"),
    "vocab-mismatch": ({"vocab_size": "9"}, None, r"centroids \(4, 192\) do not match vocab_size=9"),
    "patch-too-big": ({"patch": "200", "input_size": "112"}, torch.zeros(4, 3 * 200 * 200),
                      "1 <= patch <= input_size"),
    "huge-view": ({"input_size": str(10**9)}, None, "input_size <= 8192"),
    "patch-wrong": ({"patch": "4"}, None, r"centroids must be \(vocab, 3·4·4=48\)"),
    "nan": ({}, torch.full((4, 192), float("nan")), "not finite"),
    "integers": ({}, torch.zeros(4, 192, dtype=torch.int32), "not finite floating-point"),
    "one-row": ({"vocab_size": "1"}, torch.zeros(1, 192), "at least 2 rows"),
}


@pytest.mark.parametrize("name", sorted(KMEANS))
def test_crafted_kmeans_file_is_one_line_naming_it(tmp_path, name):
    changes, centroids, why = KMEANS[name]
    meta = {FORMAT_KEY: "kmeans_patch", "vocab_size": "4", "patch": "8", "input_size": "112"}
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    path = tmp_path / f"{name}.safetensors"
    save_file({"centroids": torch.zeros(4, 192) if centroids is None else centroids}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=why) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("n_hid", ["1⁶", "sixteen"])
def test_a_dvae_file_whose_settings_are_not_whole_numbers_is_named(tmp_path, n_hid):
    model = DVAEEncoder(DVAEConfig(n_hid=16, n_blk_per_group=1, vocab_size=64))
    path = tmp_path / "dvae.safetensors"
    save_file(model.state_dict(), str(path), metadata={**model.metadata(), "n_hid": n_hid})
    with pytest.raises(ValueError, match=f"metadata {{'n_hid': '{n_hid}'}} is not a whole number") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_damaged_or_missing_tensors_and_odd_paths(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    save_file({"other": torch.zeros(2)}, str(tmp_path / "empty.safetensors"),
              metadata={FORMAT_KEY: "kmeans_patch", "vocab_size": "2", "patch": "8", "input_size": "112"})
    os.mkfifo(tmp_path / "pipe.safetensors")
    cases = {"garbage.safetensors": "is not a readable safetensors file", "empty.safetensors": "no 'centroids'",
             "pipe.safetensors": "is not a regular file"}
    for name, why in cases.items():
        with pytest.raises(ValueError, match=why):
            load_tokenizer(tmp_path / name)
    with pytest.raises(ValueError, match="patch=0 must be in"):
        from lomar.tokenizers import fit_kmeans_tokenizer
        fit_kmeans_tokenizer(torch.rand(2, 3, 16, 16), vocab_size=2, patch=0, input_size=16)
    with pytest.raises(ValueError, match="1 <= patch"):
        KMeansTokenizer(torch.zeros(2, 0), patch=0)


def test_tokenizer_fit_bounds_the_size_before_reading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lomar.data.folder.build_image_list", lambda *a: pytest.fail("read the data"))
    code = main(["tokenizer", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "t.safetensors"),
                 "--size", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert re.match(r"lomar tokenizer fit: error: --size 100000 with --max-images 2048 needs 228,881.8 GiB of views "
                    r"\(limit 4 GiB\); pass --size 416 or less \(a multiple of --patch 8\)", err), err
    assert main(["tokenizer", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "t.safetensors"),
                 "--size", "512", "--max-images", "2049"]) == 2  # 6 GiB: over
    assert "needs 6.0 GiB of views (limit 4 GiB); pass --max-images 1365 or fewer or --size 416 or less (a multiple " \
           "of --patch 8)\n" in capsys.readouterr().err
    # a 32 px patch's default views (448 px) of the default 2048 images: over, with fixes that run as given
    assert main(["tokenizer", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "t.safetensors"),
                 "--patch", "32"]) == 2
    assert capsys.readouterr().err == ("lomar tokenizer fit: error: --size 448 (the default, 14 x --patch) with "
                                       "--max-images 2048 needs 4.6 GiB of views (limit 4 GiB); pass --max-images 1783 "
                                       "or fewer or --size 416 or less (a multiple of --patch 32)\n")


def test_tokenizer_fit_views_follow_the_patch_unless_sized(tmp_path, capsys):
    """`lomar pretrain --decode windows` asks for `lomar tokenizer fit --patch P` at the model's patch: its view
    defaults to 14 x P (112 px at the default 8), as a fixed 112 px refused P = 12 or 32."""
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (40, 40), (i * 90, 30, 60)).save(tmp_path / f"{i}.png")
    fit = ["tokenizer", "fit", "--data", str(tmp_path), "--vocab", "2", "--iters", "1", "--out"]
    assert main([*fit, str(tmp_path / "t12.safetensors"), "--patch", "12"]) == 0
    assert "images of " in capsys.readouterr().out
    tokenizer = load_tokenizer(tmp_path / "t12.safetensors")
    assert (tokenizer.patch, tokenizer.input_size, tokenizer.vocab_size) == (12, 168, 2)
    assert main([*fit, str(tmp_path / "t32.safetensors"), "--patch", "32", "--size", "100"]) == 2
    assert capsys.readouterr().err == ("lomar tokenizer fit: error: --size 100 is not a multiple of --patch 32; pass "
                                       "--size 96 or 128, or drop --size (default 14 x --patch = 448)\n")
    assert main([*fit, str(tmp_path / "t600.safetensors"), "--patch", "600", "--max-images", "1"]) == 2
    assert capsys.readouterr().err == ("lomar tokenizer fit: error: --size 8400 (the default, 14 x --patch) is over "
                                       "8192 px, the largest view; pass --size 7800 or less\n")
    assert main(["tokenizer", "fit", "--help"]) == 0
    assert "(default: 14 x --patch, 14x14 tokens: 112 with the default --patch 8)" in " ".join(
        capsys.readouterr().out.split())


@pytest.mark.slow
def test_converting_the_crafted_dvae_stays_within_a_memory_cap(tmp_path):
    """The command line on the 38 GB claim, allowed 1.5 GiB more than torch maps: one line, exit 2."""
    path = _write(_zero_byte_state(4096), tmp_path / "evil.pth")
    capped = textwrap.dedent("""
        import re, resource, sys
        import torch
        mapped = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mapped + (3 << 29), mapped + (3 << 29)))
        from lomar.cli.app import main
        sys.exit(main(sys.argv[1:]))
    """)
    done = subprocess.run([sys.executable, "-c", capped, "tokenizer", "convert", str(path), "--to",
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"lomar tokenizer convert: error: {path} does not fit the dVAE encoder")
    assert done.stderr.count("\n") == 1 and not (tmp_path / "out.safetensors").exists()


def test_tokenizer_fit_errors_name_its_flags_and_check_the_output_first(tmp_path, capsys):
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (40, 40), (i * 90, 30, 60)).save(tmp_path / f"{i}.png")
    fit = ["tokenizer", "fit", "--data", str(tmp_path), "--out"]
    assert main([*fit, str(tmp_path / "t.safetensors"), "--size", "30"]) == 2
    assert capsys.readouterr().err.startswith("lomar tokenizer fit: error: --size 30 is not a multiple of --patch 8")
    assert main([*fit, str(tmp_path / "t.safetensors"), "--vocab", "100000"]) == 2
    assert "error: --vocab 100000 is more than the " in capsys.readouterr().err
    assert main([*fit, str(tmp_path)]) == 2  # a folder: refused before the images are read
    assert "--out" in capsys.readouterr().err


def test_tokenizer_fit_stops_when_over_a_tenth_of_its_images_is_unreadable(tmp_path, capsys):
    from PIL import Image

    for i in range(10):
        Image.new("RGB", (24, 24), (i * 20, 30, 60)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    fit = ["tokenizer", "fit", "--data", str(tmp_path), "--vocab", "4", "--size", "16", "--out"]
    assert main([*fit, str(tmp_path / "t.safetensors")]) == 0  # 1 of 11: fitted, and said
    assert "(vocabulary 4, 10 images, 1 unreadable skipped)" in capsys.readouterr().out
    (tmp_path / "9.png").write_bytes(b"")
    assert main([*fit, str(tmp_path / "u.safetensors")]) == 2
    *warned, err = capsys.readouterr().err.splitlines()  # each unreadable image warned of as it is met, then one line
    assert [line.startswith("lomar tokenizer fit: warning: skipped unreadable image ") for line in warned] == [True] * 2
    assert err.startswith("lomar tokenizer fit: error: 2 of 11 images (over 10%) could not be used, e.g. ")
    assert "9.png: the file is empty" in err and not (tmp_path / "u.safetensors").exists()
