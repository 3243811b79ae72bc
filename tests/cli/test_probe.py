"""`lomar knn` / `lomar linprobe` settings (lomar.cli.probe)."""

from lomar.cli.app import main


def test_a_linear_probe_warm_up_longer_than_its_epochs_names_the_fix(tmp_path, capsys):
    """MAE's protocol with fewer --epochs than its default 10 warm-up epochs: the error named the bound alone."""
    assert main(["linprobe", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path), "--protocol", "mae", "--epochs",
                 "2"]) == 2
    assert capsys.readouterr().err == ("lomar linprobe: error: --warmup-epochs must be in [0, --epochs 2], got 10; "
                                       "lower --warmup-epochs or raise --epochs\n")
