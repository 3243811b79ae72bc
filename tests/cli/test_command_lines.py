"""A command's warnings, its loggers' and Python's, carry the command's prefix as its own lines do."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import subprocess
import sys
import termios
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
        # a colour code, as torch's messages may hold, is not for a log
        warnings.warn_explicit("a library's \\x1b[33mnotice\\x1b[0m\\nover two lines", UserWarning,
                               "/site/torch/nn/x.py", 12)
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


# A progress bar live on a terminal when a record and a library's warning come (a loader worker skipping an image).
_BAR_SCRIPT = textwrap.dedent("""
    import logging, warnings
    from lomar.cli.command_lines import prefix_warnings
    from lomar.progress_bar import progress

    give_back = prefix_warnings("lomar pretrain")
    bar = progress(total=4, desc="epoch 1")
    bar.update(1)
    logging.getLogger("lomar.data").warning("skipped unreadable image x.png")
    warnings.warn_explicit("a library's notice", UserWarning, "/site/torch/x.py", 7)
    bar.update(3)
    bar.close()
    give_back()
""")


def _screen(output: str) -> list[str]:
    """The lines a terminal shows for ``output``: a carriage return goes back to the line's start, ESC[K erases from
    there to its end, and a character overwrites the one under the cursor."""
    lines, line, column, at = [], [], 0, 0
    while at < len(output):
        if output.startswith("\x1b[K", at):
            del line[column:]
            at += 3
            continue
        char, at = output[at], at + 1
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("".join(line))
            line, column = [], 0
        else:
            line[column:column + 1] = [char]
            column += 1
    return lines + ["".join(line)] * bool(line)


def test_on_a_terminal_a_warning_begins_its_own_line_under_a_live_progress_bar():
    main_end, child_end = os.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws to the width
    with os.fdopen(main_end, "rb", buffering=0) as terminal:
        done = subprocess.Popen([sys.executable, "-c", _BAR_SCRIPT], stdout=child_end, stderr=child_end)
        os.close(child_end)
        output = b""
        while True:
            try:
                chunk = terminal.read(4096)
            except OSError:  # EIO: the child's side is closed
                break
            if not chunk:
                break
            output += chunk
        assert done.wait(timeout=120) == 0, output
    screen = _screen(output.decode())
    assert "lomar pretrain: warning: skipped unreadable image x.png" in screen, screen
    assert "lomar pretrain: warning: a library's notice (UserWarning, /site/torch/x.py:7)" in screen, screen
    assert any(line.startswith("epoch 1: 100%") for line in screen), screen  # the bar goes on below them
