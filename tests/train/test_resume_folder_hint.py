"""The refusal of ``--resume FOLDER`` names what to pass instead as a shell reads it: a folder with a space in its name
is one argument in the file and the --out it suggests."""

import shlex

import pytest

from lomar.train.settings import ConfigError
from lomar.train.settings_resume import resume_target


@pytest.mark.parametrize("kept, passed", [("last.pt", "last.pt"), ("checkpoint-000004.pt", None)])
def test_a_folder_to_resume_with_a_space_is_named_as_one_argument(tmp_path, kept, passed):
    run = tmp_path / "my run"
    run.mkdir()
    (run / kept).write_bytes(b"")
    with pytest.raises(ConfigError) as refused:
        resume_target({"resume": str(run)})
    message = str(refused.value)
    assert f"--out {shlex.quote(str(run))} --resume auto" in message
    if passed:
        assert f"pass {shlex.quote(str(run / passed))}, or" in message


def test_a_consolidated_fsdp_model_to_resume_names_its_folder_as_one_argument(tmp_path):
    from lomar.train.config import PretrainConfig

    run = tmp_path / "my run"
    with pytest.raises(ConfigError) as refused:
        PretrainConfig.saved_settings({"config": {"fsdp": True}}, run / "last.pt")
    message = str(refused.value)
    assert f"pass its folder {shlex.quote(str(run / 'checkpoint-NNNNNN.dcp'))}, or " in message
    assert f"--out {shlex.quote(str(run))} --resume auto" in message


def test_a_best_pt_to_resume_names_the_commands_that_take_it_as_one_argument(tmp_path):
    import torch

    from lomar.checkpoints.kinds import FINETUNE_FORMAT
    from lomar.train.finetune_config import FinetuneConfig

    run = tmp_path / "my run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    torch.save({"format": FINETUNE_FORMAT, "model": {}, "settings": {}, "step": 4}, run / "best.pt")
    with pytest.raises(ConfigError) as refused:
        FinetuneConfig.saved_run({"resume": str(run / "best.pt")})
    message = str(refused.value)
    for fix in (f"--resume {shlex.quote(str(run / 'last.pt'))}", f"--pretrained {shlex.quote(str(run / 'best.pt'))}",
                f"--eval-only --pretrained {shlex.quote(str(run / 'best.pt'))}"):
        assert fix in message
