"""A BEiT run resumes only with the tokenizer it trained with: the checkpoint names it by path, and keeps its digest;
a moved run folder reads its own fitted tokenizer where it now is."""

from __future__ import annotations

import shutil

from helpers import pretrain
from lomar.checkpoints.io import safe_load
from lomar.tokenizers import fit_kmeans_tokenizer, load_tokenizer


def test_a_resumed_beit_run_refuses_a_replaced_tokenizer_file(tmp_path, image_dir, capsys, no_run_figures):
    """The file was read again by path: one replaced since (the same vocabulary, other centroids) silently changed
    the targets of the rest of the run."""
    import pytest
    import torch

    run = tmp_path / "run"
    flags = ("--data", str(image_dir), "--out", str(run))
    assert pretrain(*flags, "--method", "beit", "--max-steps", "1", "--schedule-steps", "5") == 0
    path = run / "tokenizer.safetensors"
    original = load_tokenizer(path)
    assert safe_load(run / "last.pt")["tokenizer_digest"] == original.digest()
    assert pretrain(*flags, "--max-steps", "2", "--resume", "auto") == 0  # the same file: resumes
    side = original.input_size
    views = torch.rand(original.vocab_size, 3, side, side, generator=torch.Generator().manual_seed(1))
    other = fit_kmeans_tokenizer(views, vocab_size=original.vocab_size, patch=original.stride, seed=1,
                                 input_size=side)
    other.save(path)
    capsys.readouterr()
    assert pretrain(*flags, "--max-steps", "3", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert (f"--resume: the tokenizer {path} (tensors' sha256 {other.digest()[:12]}) is not the tokenizer this run "
            f"trained with ({original.digest()[:12]}): its targets would change mid-run" in err
            and err.count("\n") == 1), err
    original.save(path)  # restored: the run goes on
    assert pretrain(*flags, "--max-steps", "3", "--resume", "auto") == 0
    # A run folder moved since: its fitted tokenizer is looked for in the folder where it is, not where the folder
    # had been ("does not exist"), and the run goes on.
    moved = run.rename(tmp_path / "moved")
    run.mkdir()
    other.save(path)  # a new run in the old folder since: its own tokenizer there
    assert pretrain("--resume", str(moved / "last.pt"), "--max-steps", "4") == 0
    assert safe_load(moved / "last.pt")["config"]["tokenizer"] == str(moved / "tokenizer.safetensors")
    # A tokenizer file moved (or rewritten by `lomar tokenizer convert`) is the same tokenizer: --tokenizer naming it
    # is no change of setting, as its digest is the checkpoint's: the run goes on, reading it from there.
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(moved / "tokenizer.safetensors", elsewhere)
    capsys.readouterr()
    assert pretrain("--resume", str(moved / "last.pt"), "--max-steps", "5", "--tokenizer", str(elsewhere)) == 0
    assert (f"note: --tokenizer {elsewhere} holds the tokenizer the run recorded as {moved / 'tokenizer.safetensors'}"
            in capsys.readouterr().err)
    assert safe_load(moved / "last.pt")["config"]["tokenizer"] == str(elsewhere)
    # the digest is the resume point's read of the checkpoint: the check reads the file no second time
    from lomar.train.config import PretrainConfig

    load, reads = torch.load, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or load(f, *a, **k))
        saved = PretrainConfig.saved_run({"resume": str(moved / "last.pt"), "out": str(moved),
                                          "tokenizer": str(moved / "tokenizer.safetensors")}).settings
    assert saved["tokenizer"] == str(moved / "tokenizer.safetensors") and reads == [str(moved / "last.pt")]
    assert "holds the tokenizer the run recorded" in capsys.readouterr().err
    # another tokenizer: one line naming both, before any work
    assert pretrain("--resume", str(moved / "last.pt"), "--max-steps", "5", "--tokenizer", str(path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--tokenizer {path} (tensors' sha256 {other.digest()[:12]})" in err
    assert f"trained with, {elsewhere} ({original.digest()[:12]})" in err


def test_a_run_stopped_before_its_first_checkpoint_checks_a_given_tokenizer_against_its_recorded_file(tmp_path,
                                                                                                       capsys):
    """``--resume auto`` with only OUT/config.yaml: the run's fitted tokenizer is read where the folder now is, and a
    --tokenizer given again is checked against that file's digest (no checkpoint keeps one)."""
    import pytest
    import torch
    import yaml

    from lomar.train.config import PretrainConfig
    from lomar.train.settings import ConfigError

    views = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fitted, other = (fit_kmeans_tokenizer(views, vocab_size=3, patch=8, seed=seed, input_size=16) for seed in (0, 1))
    run = tmp_path / "moved"  # recorded at tmp_path / "run", gone since
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "beit",
                                                     "tokenizer": str(tmp_path / "run" / "tokenizer.safetensors")}))
    fitted.save(run / "tokenizer.safetensors")
    explicit = {"out": str(run), "resume": "auto"}
    saved = PretrainConfig.saved_run(explicit)
    assert saved.settings["tokenizer"] == str(run / "tokenizer.safetensors") and saved.point is None
    assert saved.source == str(run / "config.yaml")
    shutil.copyfile(run / "tokenizer.safetensors", tmp_path / "copy.safetensors")
    saved = PretrainConfig.saved_run({**explicit, "tokenizer": str(tmp_path / "copy.safetensors")}).settings
    assert saved["tokenizer"] == str(tmp_path / "copy.safetensors")
    assert f"note: --tokenizer {tmp_path / 'copy.safetensors'} holds the tokenizer" in capsys.readouterr().err
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match=f"sha256 {other.digest()[:12]}.*, {run / 'tokenizer.safetensors'} "
                                          f"\\({fitted.digest()[:12]}\\)"):
        PretrainConfig.saved_run({**explicit, "tokenizer": str(tmp_path / "other.safetensors")})
    (run / "tokenizer.safetensors").unlink()
    with pytest.raises(ConfigError, match="which is gone, and the run kept no digest"):
        PretrainConfig.saved_run({**explicit, "tokenizer": str(tmp_path / "copy.safetensors")})


def test_the_loaded_tokenizer_is_checked_against_the_checkpoints_digest():
    """A file replaced in place keeps its recorded path, so only the loaded tensors' digest shows the change: the
    refusal names both digests, as --tokenizer's and lomar visualize's (methods.beit.not_trained_with)."""
    from types import SimpleNamespace

    import pytest

    from lomar.errors import UsageError
    from lomar.methods import get_method
    from lomar.train.pretrain import PretrainTask

    # the generic task asks its method (methods.beit.resume_refusal), against what the method recorded of its model
    task = SimpleNamespace(config=SimpleNamespace(tokenizer="/runs/a/tokenizer.safetensors", workers=1),
                           runtime=SimpleNamespace(method=get_method("beit")),
                           run_record={"tokenizer_digest": "a" * 64}, iterable=False)
    with pytest.raises(UsageError) as refused:
        PretrainTask.load(task, {"tokenizer_digest": "b" * 64})
    assert str(refused.value) == (
        "--resume: the tokenizer /runs/a/tokenizer.safetensors (tensors' sha256 aaaaaaaaaaaa) is not the tokenizer "
        "this run trained with (bbbbbbbbbbbb): its targets would change mid-run; restore that file, or start a new run "
        "with another --out")
    PretrainTask.load(task, {"tokenizer_digest": "a" * 64})  # the same tensors
    PretrainTask.load(task, {})  # a run saved before the digest was kept


def test_the_methods_without_a_tokenizer_keep_nothing_to_check_a_resume_against():
    """LoMaR's and MAE's runs record nothing beyond their settings for a resume, and refuse none for what another
    method's checkpoint would keep."""
    from lomar.methods import get_method

    for name in ("lomar", "mae"):
        method = get_method(name)
        assert method.run_record(None) == {}
        assert method.resume_refusal(None, {}, {"tokenizer_digest": "b" * 64}) is None


def test_the_tokenizer_digest_entry_is_named_by_the_beit_method_alone():
    """The checkpoint's entry is BEiT's run_record's: lomar visualize read it by its literal name, which a rename in
    methods/beit.py would have left reading nothing (no check, silently). Every reader asks beit.kept_digest."""
    from pathlib import Path

    import lomar
    from lomar.methods.beit import kept_digest, run_record

    src = Path(lomar.__file__).parent
    spelled = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "tokenizer_digest" in p.read_text())
    assert spelled == ["methods/beit.py"]
    record = run_record(type("Model", (), {"tokenizer": type("T", (), {"digest": lambda self: "c" * 64})()})())
    assert kept_digest(record) == "c" * 64 and kept_digest({}) is None
