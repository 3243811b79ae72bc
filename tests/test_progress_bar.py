"""lomar.progress_bar off a terminal: whole lines in a log file."""

import io
import sys

from lomar.progress_bar import progress


def test_a_progress_line_in_a_log_file_keeps_every_figure(monkeypatch):
    """Off a terminal no width cuts the line: a run's line ends with its lr, its last figure."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress(total=12, desc="pretrain")
    bar.set_postfix(epoch=0, img_s=1.6, input_wait="0%", loss=1.2432, lr="1.42e-06", refresh=False)
    bar.update(5)
    bar.refresh()
    bar.close()
    (line,) = log.getvalue().splitlines()
    assert line.startswith("pretrain:  42%") and line.endswith("loss=1.24, lr=1.42e-06]")
