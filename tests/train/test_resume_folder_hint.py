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
