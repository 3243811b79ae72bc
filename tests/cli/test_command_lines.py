"""A command's warnings, its loggers' and Python's, carry the command's prefix as its own lines do."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

from lomar.cli.app import main
from lomar.cli.command_lines import prefix_warnings

# A command (compose-digits, its run replaced) that logs as lomar's libraries do and meets a library's warning, in a
# process of its own: Python's defaults (no logging handler set, the default warning display) are what a user has.
_SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    import lomar.cli.compose as compose
    from lomar.cli.app import main

    def run(args):
        logging.getLogger("lomar.data").warning("%s: 2 hidden image file(s) not used", "/data/train")
        logging.getLogger("lomar.data").info("not shown: below WARNING")
        warnings.warn_explicit("a library's notice\\nover two lines", UserWarning, "/site/torch/nn/x.py", 12)
        return 0

    compose.run = run
    code = main(["compose-digits", "--out", sys.argv[1]])
    logging.getLogger("lomar.data").warning("after the command")
    warnings.warn_explicit("after too", UserWarning, "/site/timm/y.py", 3)
    sys.exit(code)
""")


def test_a_commands_log_records_and_warnings_begin_with_its_prefix_until_it_ends(tmp_path):
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "set")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[:2] == [
        "lomar compose-digits: warning: /data/train: 2 hidden image file(s) not used",
        "lomar compose-digits: warning: a library's notice over two lines (UserWarning, /site/torch/nn/x.py:12)"]
    # after it, Python's own display again: a Python caller's later code is not the command's
    assert lines[2] == "after the command" and lines[3] == "/site/timm/y.py:3: UserWarning: after too", lines


def test_a_caller_recording_warnings_still_records_them_and_its_handler_still_gets_the_records(
        tmp_path, monkeypatch, caplog, capsys):
    import lomar.cli.compose as compose

    def run(args):
        logging.getLogger("lomar.data").warning("listed: %d", 3)
        warnings.warn("recorded, not printed", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(compose, "run", run)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, logger="lomar"):
        warnings.simplefilter("always")
        assert main(["compose-digits", "--out", str(tmp_path / "set")]) == 0
    assert [str(w.message) for w in seen] == ["recorded, not printed"]
    assert [r.getMessage() for r in caplog.records] == ["listed: 3"]
    assert capsys.readouterr().err == "lomar compose-digits: warning: listed: 3\n"


def test_giving_back_leaves_no_handler_and_a_callers_own_formatwarning(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # put back at the end, whatever happens
    before = list(logging.getLogger("lomar").handlers)
    give_back = prefix_warnings("lomar knn")
    mine = lambda *args, **kwargs: "mine\n"  # noqa: E731 - a caller's own, set while the command runs
    warnings.formatwarning = mine
    give_back()
    assert logging.getLogger("lomar").handlers == before and warnings.formatwarning is mine
