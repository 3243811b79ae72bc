"""What a tokenizer file is called and what it holds: a safetensors tokenizer is known by its
content, the CLI writes only .safetensors names, a dVAE must read RGB, and each refusal names
the command that fixes it."""

import pytest
import torch
from safetensors.torch import save_file

from lomar.cli.app import main
from lomar.tokenizers import DVAEConfig, DVAEEncoder, KMeansTokenizer, convert_dvae, load_dvae, load_tokenizer
from lomar.tokenizers import dvae as dvae_module
from lomar.tokenizers.base import FORMAT_KEY, is_safetensors

SMALL = {"n_hid": 16, "n_blk_per_group": 1, "vocab_size": 32}


def _one_line(err: str, command: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"lomar tokenizer {command}: error: "), err
    return err


def test_a_tokenizer_saved_under_another_name_is_still_read(tmp_path):
    # Written before the CLI refused such names (or by save() from Python): still a safetensors file.
    kmeans = KMeansTokenizer(torch.randn(4, 192)).save(tmp_path / "x.pt")
    assert is_safetensors(kmeans) and isinstance(load_tokenizer(kmeans), KMeansTokenizer)
    torch.save({"model": DVAEEncoder(DVAEConfig(**SMALL)).state_dict()}, tmp_path / "sd.pt")
    dvae = convert_dvae(tmp_path / "sd.pt", tmp_path / "d.pth")
    assert isinstance(load_tokenizer(dvae), DVAEEncoder) and isinstance(load_dvae(dvae), DVAEEncoder)
    assert not is_safetensors(tmp_path / "sd.pt")  # a torch.save zip is still read as a checkpoint


def test_a_tokenizer_under_another_name_cut_in_its_header_is_called_a_damaged_safetensors_file(tmp_path):
    """The header length it starts with no longer fits the file, yet it starts as a safetensors file: read as one,
    its reader names the damage, as for a file cut in its data (not a dVAE pickle and the files to use instead)."""
    whole = KMeansTokenizer(torch.randn(4, 192)).save(tmp_path / "x.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[:8 + int.from_bytes(whole[:8], "little") // 2])
    assert is_safetensors(cut)
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable safetensors file \(.*\); the file is damaged or "
                                         r"not a tokenizer$"):
        load_tokenizer(cut)


@pytest.mark.parametrize("command", ["fit", "convert"])
def test_the_cli_writes_only_safetensors_names_and_says_so_first(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr("lomar.data.folder.build_image_list", lambda *a: pytest.fail("read the data"))
    monkeypatch.setattr("lomar.tokenizers.convert_dvae", lambda *a: pytest.fail("read the source"))
    flag = "--out" if command == "fit" else "--to"
    args = ["--data", str(tmp_path)] if command == "fit" else [str(tmp_path / "encoder.pkl")]
    out = tmp_path / "tok" / "x.pt"
    assert main(["tokenizer", command, *args, flag, str(out)]) == 2
    line = _one_line(capsys.readouterr().err, command)
    assert f"{flag} {out}: a tokenizer is written as safetensors; give a name ending in .safetensors, " \
           f"e.g. {flag} {out.with_suffix('.safetensors')}" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["fit", "convert"])
def test_a_folder_given_as_the_file_is_answered_with_a_name_the_cli_takes(tmp_path, capsys, command):
    flag = "--out" if command == "fit" else "--to"
    args = ["--data", str(tmp_path)] if command == "fit" else [str(tmp_path / "encoder.pkl")]
    folder = tmp_path / "tok.safetensors"
    folder.mkdir()
    assert main(["tokenizer", command, *args, flag, str(folder)]) == 2
    line = _one_line(capsys.readouterr().err, command)
    assert f"{flag} {folder} is a folder; give a file name such as {folder / 'tokenizer.safetensors'}" in line


def test_converting_a_kmeans_tokenizer_says_it_needs_no_conversion(tmp_path, capsys):
    path = KMeansTokenizer(torch.randn(4, 192)).save(tmp_path / "t.safetensors")
    assert main(["tokenizer", "convert", str(path), "--to", str(tmp_path / "d.safetensors")]) == 2
    line = _one_line(capsys.readouterr().err, "convert")
    assert f"{path} is a k-means tokenizer, not a dVAE encoder: it needs no conversion; pass it as it is to " \
           f"`lomar pretrain --tokenizer`" in line and "convert_dvae" not in line


def test_refusals_name_the_command_as_well_as_the_function(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x01junk" * 8)
    with pytest.raises(ValueError, match=r"from `lomar tokenizer convert` \(lomar\.tokenizers\.convert_dvae\)$"):
        load_tokenizer(tmp_path / "junk.pt")
    (tmp_path / "notes.txt").write_text("not a tokenizer\n")  # was 'not a dVAE', as if it were one but damaged
    with pytest.raises(ValueError, match=r"notes\.txt is a text file, not a tokenizer file; a tokenizer file is a "
                                         r"k-means tokenizer from `lomar tokenizer fit` .* or a DALL-E dVAE encoder"):
        load_tokenizer(tmp_path / "notes.txt")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={FORMAT_KEY: "other"})
    with pytest.raises(ValueError, match=r"with `lomar tokenizer convert` \(lomar\.tokenizers\.convert_dvae\) or a "
                                         r"k-means tokenizer with `lomar tokenizer fit`"):
        load_tokenizer(tmp_path / "other.safetensors")


def test_a_dvae_that_does_not_read_rgb_is_refused_by_convert_and_load(tmp_path, capsys):
    state = DVAEEncoder(DVAEConfig(**SMALL, input_channels=1)).state_dict()
    torch.save({"model": state}, tmp_path / "dvae_1ch.pt")
    target = tmp_path / "d1.safetensors"
    assert main(["tokenizer", "convert", str(tmp_path / "dvae_1ch.pt"), "--to", str(target)]) == 2
    line = _one_line(capsys.readouterr().err, "convert")
    assert "dvae_1ch.pt: the dVAE has input_channels=1, but BEiT's tokenizer reads RGB views; use an encoder " \
           "with 3 input channels" in line and not target.exists()
    save_file(state, str(target), metadata={FORMAT_KEY: dvae_module.FORMAT})  # as the old convert wrote it
    with pytest.raises(ValueError, match=r"d1.safetensors: the dVAE has input_channels=1, but BEiT's tokenizer"):
        load_tokenizer(target)
