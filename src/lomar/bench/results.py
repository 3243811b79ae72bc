"""``lomar bench``'s pretrain task, row by row: every configuration's results, written as they come.

A bench of many configurations can be stopped before its end: Ctrl-C, a SIGTERM, a device lent for
minutes and killed at its time limit. :class:`Results` keeps one row per configuration and writes
the whole results file after every timed round and every failure, marked ``complete: false`` with
what was ``left`` to run until the end, so that a bench cut short leaves every row it measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from lomar.bench.host import load_average
from lomar.bench.report import beit_comparisons, compare
from lomar.bench.timing import GemmCeiling, StepRunner, failure

__all__ = ["Results"]

Config = tuple[str, "int | None", str]  # (method, windows, window setting), as cli.bench's plan gives them


class Results:
    """Rows for ``plan`` ({size: [config, …]}), one size at a time; ``save()`` writes them through ``write``.

    A row's ``status``: ``ok`` (every timed step ran), ``partial`` (the bench stopped between its timed steps:
    a median of fewer), ``failed`` (``error`` says at which stage and why, ``traceback`` where it may be a bug; no
    step time). A configuration not yet timed has no row: it is in ``meta['left']``, with every one not finished.
    """

    def __init__(self, plan: dict[int, list[Config]], steps: int, gemm: GemmCeiling, meta: dict, common: dict,
                 write: Callable[[dict], None]):
        self.plan, self.steps, self.gemm, self.meta, self.common, self.write = plan, steps, gemm, meta, common, write
        self.done: list[dict] = []  # the rows of the sizes timed to their end
        self.size: int | None = None
        self.current: list[tuple[Config, StepRunner | None, str | None, str | None]] = []  # error, traceback
        self.started = time.perf_counter()

    def build(self, size: int, make: Callable[[str, int, int | None], StepRunner]) -> list[StepRunner]:
        """``size``'s runners, ``make(method, size, windows)`` each; one whose building raises a RuntimeError (out of
        memory, say) is a failed row instead, and the others are built."""
        self.size, self.current = size, []
        for config in self.plan[size]:
            try:
                runner, error, trace = make(config[0], size, config[1]), None, None
            except RuntimeError as exc:
                line, trace = failure(exc)
                runner, error = None, f"build: {line}"
            self.current.append((config, runner, error, trace))
            if error:
                self.save()
        return [r for _, r, _, _ in self.current if r is not None]

    def end_size(self) -> list[dict]:
        """The rows of the size just timed, now kept as done."""
        rows = [row for row in map(self._row, self.current) if row is not None]
        self.done += rows
        self.current = []
        return rows

    def rows(self) -> list[dict]:
        return self.done + [row for row in map(self._row, self.current) if row is not None]

    def _row(self, entry: tuple[Config, StepRunner | None, str | None, str | None]) -> dict | None:
        (method, windows, setting), runner, error, trace = entry
        if runner is not None and runner.error:
            error, trace = runner.error, runner.trace
        times = list(runner.times) if runner else []
        if not error and not times:
            return None
        status = "failed" if error else "ok" if len(times) >= self.steps else "partial"
        step_s = statistics.median(times) if times and not error else None
        row = dict(method=method, img_size=self.size, windows=windows, window_setting=setting, status=status,
                   step_s=step_s, images_per_s=step_s and self.common["batch_size"] / step_s,
                   flops=runner.flops if runner else 0, decoder_flops=runner.decoder_flops if runner else 0,
                   encoder_tokens=runner.encoder_tokens if runner else 0,
                   achieved_flops=step_s and runner.flops / step_s,
                   peak_mem_bytes=runner.peak_mem[0] if runner else -1,
                   peak_mem_kind=runner.peak_mem[1] if runner else "none", step_times_s=times, **self.common)
        if error:
            row["error"] = error
        if trace:
            row["traceback"] = trace
        return row

    def save(self, complete: bool = False) -> dict:
        """The results file's content (rows, ratios, meta) as of now, written; returned for the table."""
        rows = self.rows()
        by_library = self.gemm.medians() if all(self.gemm.rates.values()) else {}  # none before the first round
        ceiling = max(by_library.values(), default=None)
        for row in rows:
            row.update(gemm_flops=ceiling, mfu=row["achieved_flops"] / ceiling
                       if ceiling and row["achieved_flops"] is not None else None)
        measured = [row for row in rows if row["step_s"] is not None]
        finished = {(r["method"], r["img_size"], r["windows"]) for r in rows if r["status"] != "partial"}
        left = [dict(method=method, img_size=size, windows=windows) for size, configs in self.plan.items()
                for method, windows, _ in configs if (method, size, windows) not in finished]
        meta = dict(self.meta, complete=complete, left=left, load_avg_after=load_average(), gemm_flops=ceiling,
                    gemm_flops_all=self.gemm.per_call(), gemm_flops_by_library=by_library,
                    wall_s=time.perf_counter() - self.started)
        result = dict(meta=meta, records=rows, comparisons=compare(measured) if measured else [],
                      beit_comparisons=beit_comparisons(measured))
        self.write(result)
        return result
