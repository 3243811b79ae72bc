"""`lomar knn` / `lomar linprobe` settings (lomar.cli.probe)."""

from lomar.cli.app import main


def test_a_linear_probe_warm_up_longer_than_its_epochs_names_the_fix(tmp_path, capsys):
    """MAE's protocol with fewer --epochs than its default 10 warm-up epochs: the error named the bound alone."""
    assert main(["linprobe", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path), "--protocol", "mae", "--epochs",
                 "2"]) == 2
    assert capsys.readouterr().err == ("lomar linprobe: error: --warmup-epochs must be in [0, --epochs 2], got 10; "
                                       "lower --warmup-epochs or raise --epochs\n")


def test_knn_and_linprobe_name_the_files_they_wrote(pretrained, labelled_folder, tmp_path, capsys):
    """knn's --json and linprobe's --save are named on stderr once written; --overwrite replaces the --json."""
    common = ["--data", str(labelled_folder), "--img-size", "32", "--workers", "0", "--device", "cpu"]
    result, probe = tmp_path / "knn.json", tmp_path / "probe.pt"
    assert main(["knn", str(pretrained), *common, "--k", "3", "--json", str(result)]) == 0
    assert f"lomar knn: wrote the result to {result}\n" in capsys.readouterr().err
    assert main(["linprobe", str(pretrained), *common, "--epochs", "2", "--save", str(probe)]) == 0
    said = capsys.readouterr()
    assert f"lomar linprobe: wrote the probe to {probe}\n" in said.err and "wrote" not in said.out
    assert result.is_file() and probe.is_file()
    assert main(["knn", str(pretrained), *common, "--k", "3", "--json", str(result), "--overwrite"]) == 0


def test_an_existing_output_is_refused_before_the_encoder_loads(tmp_path, capsys):
    """knn's --json and linprobe's --save / --json replace an existing file only with --overwrite, as predict and
    export do; checked before the checkpoint is read (this one is not one), so that minutes of feature extraction
    never end in a refusal."""
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    ckpt, kept = tmp_path / "ckpt.pt", tmp_path / "kept"
    ckpt.write_bytes(b"not a checkpoint")
    kept.write_text("earlier result")
    for command, flag in (("knn", "--json"), ("linprobe", "--json"), ("linprobe", "--save")):
        assert main([command, str(ckpt), "--data", str(tmp_path), flag, str(kept)]) == 2
        assert capsys.readouterr().err == (f"lomar {command}: error: {flag} {kept} already exists; pass --overwrite "
                                           f"to replace it\n")
    assert kept.read_text() == "earlier result"
