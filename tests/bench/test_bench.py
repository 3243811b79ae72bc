"""``lomar bench``: exact FLOP counts and a smoke run on a tiny model. Nothing here is timed."""

import json
import types

import pytest
import torch

from lomar.bench import timing
from lomar.bench.timing import build_runner
from lomar.cli.app import main
from lomar.window_counts import paper_windows

CPU = torch.device("cpu")

REQUIRED_KEYS = {"method", "img_size", "windows", "batch_size", "step_s", "images_per_s", "flops",
                 "achieved_flops", "mfu", "peak_mem_bytes"}


def _flops(method: str, size: int, windows: int | None) -> int:
    runner = build_runner(method, "vit_base_patch16", size, windows, 2, CPU, "fp32", False, tiny=True)
    return runner.count_flops()


def test_lomar_flops_independent_of_image_size_with_fixed_windows():
    counts = {size: _flops("lomar", size, 4) for size in (224, 448, 896)}
    assert counts[224] > 0
    assert counts[224] == counts[448] == counts[896], counts


def test_lomar_flops_grow_with_windows_and_mae_with_size():
    assert _flops("lomar", 224, 8) > _flops("lomar", 224, 4)
    assert _flops("mae", 448, None) > 3 * _flops("mae", 224, None)


def test_mae_s_decoder_flops_and_each_encoder_s_tokens_are_told_apart():
    """MAE's decoder keeps its size whatever the encoder: 95 % of vit_tiny_patch16's step FLOPs at 224 px, so a
    small model's MAE / LoMaR ratio is mostly that decoder; the bench says its share."""
    mae = build_runner("mae", "vit_base_patch16", 128, None, 2, CPU, "fp32", False, tiny=True)
    lomar = build_runner("lomar", "vit_base_patch16", 128, 2, 2, CPU, "fp32", False, tiny=True)
    mae.count_flops(), lomar.count_flops()
    assert 0 < mae.decoder_flops < mae.flops and lomar.decoder_flops == 0
    # the encoder's work an image: MAE's visible quarter of the 8x8 grid, LoMaR's 2 windows of 7x7, each + [CLS]
    assert (mae.encoder_tokens, lomar.encoder_tokens) == (64 // 4 + 1, 2 * (49 + 1))


def test_cpu_attention_flops_are_counted():
    # torch's counter lacks the CPU flash-attention kernel; lomar.bench.timing registers it.
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 3, 10, 8)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 10 * 10 * 8)


class _Attend(torch.nn.Module):
    """One attention over (2, 3, 10, 8) inputs, fused (no mask) or as plain matmuls (a bias with a gradient)."""

    def __init__(self, biased: bool):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8))
        self.bias = torch.nn.Parameter(torch.zeros(2, 3, 10, 10)) if biased else None

    def forward(self, images):
        q = images * self.scale
        return types.SimpleNamespace(loss=torch.nn.functional.scaled_dot_product_attention(
            q, q, q, attn_mask=self.bias).sum())


def test_step_counts_attention_backward_as_its_four_products_whatever_the_kernel():
    # A fused kernel's backward recomputes the scores (torch counts five products); the MFU's model FLOPs
    # count the gradient's four, as the same attention run as matmuls does: one model, one count.
    counts = []
    for biased in (False, True):
        model = _Attend(biased)
        runner = timing.StepRunner("x", 8, None, 2, model, model, torch.optim.SGD(model.parameters(), lr=0.0),
                                   torch.randn(2, 3, 10, 8), CPU, torch.float32,
                                   torch.amp.GradScaler("cpu", enabled=False))
        counts.append(runner.count_flops())
    forward = 2 * (2 * 2 * 3 * 10 * 10 * 8)
    assert counts == [3 * forward, 3 * forward]


def test_cpu_gemm_ceiling_is_the_faster_of_mkl_and_onednn(monkeypatch):
    a, b = torch.randn(64, 48), torch.randn(32, 48)
    onednn = timing._onednn_linear(a, b)
    if onednn is None:
        pytest.skip("this torch has no oneDNN")
    assert torch.allclose(onednn().to_dense(), a @ b.T, atol=1e-4)
    # each measurement times both libraries; the slower one must not set the ceiling
    seconds = iter([1.0, 2.0] + [4.0, 0.5] + [0.25, 1.0])  # warm-up (MKL, oneDNN), then two measurements
    monkeypatch.setattr(timing, "timed", lambda fn, device: (fn(), next(seconds))[1])
    ceiling = timing.GemmCeiling(CPU, "fp32", 8)
    flop = 2 * 8 ** 3
    assert [ceiling(), ceiling()] == [flop / 0.5, flop / 0.25]
    assert ceiling.rates == {"torch.mm": [flop / 4.0, flop / 0.25], "oneDNN": [flop / 0.5, flop / 1.0]}
    assert ceiling.per_call() == [flop / 0.5, flop / 0.25]
    assert ceiling.medians() == {"torch.mm": (flop / 4.0 + flop / 0.25) / 2, "oneDNN": (flop / 0.5 + flop / 1.0) / 2}


def test_paper_window_rule():
    # the paper's three points exactly; area-linear between them, area-proportional outside
    assert [paper_windows(s) for s in (160, 224, 320, 384, 416, 448, 672, 896)] == [2, 4, 5, 6, 7, 9, 20, 36]


def test_bench_smoke_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--tiny", "--sizes", "128", "192", "--windows", "paper", "2",
                 "--batch-size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--json", str(out), "--plot", str(png), "--quiet"])
    assert code == 0
    data = json.loads(out.read_text())
    records = data["records"]
    # per size: LoMaR paper (1 at 128 px, 3 at 192: the area rule), LoMaR fixed (2: at most 2 fit 128 px), MAE
    assert len(records) == 6
    for rec in records:
        assert REQUIRED_KEYS <= rec.keys()
        assert rec["step_s"] > 0 and rec["flops"] > 0 and rec["mfu"] > 0
        # the memory step is untimed: exactly --steps timings per configuration
        assert len(rec["step_times_s"]) == 2 and rec["peak_mem_kind"] == "cpu_rss_growth"
    assert {c["window_setting"] for c in data["comparisons"]} == {"paper", "fixed"}
    by_library = data["meta"]["gemm_flops_by_library"]
    assert set(by_library) == {"torch.mm", "oneDNN"} and data["meta"]["gemm_flops"] == max(by_library.values()) > 0
    assert len(data["meta"]["gemm_flops_all"]) == 4  # one per round, 2 rounds at each of 2 sizes
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "GEMM ceiling" in table and "(the faster of torch.mm " in table and "MAE / LoMaR" in table
    # what each figure is, beside it: a ratio is only as good as the steps, the load and the spread behind it
    assert ("batch 2, fp32, cpu, " in table and "s/step is the median of 2 timed training steps (forward + "
            "backward + AdamW update)" in table and "after 1 warm-up step(s) (load average before, after: " in table)
    assert " spread " in table.splitlines()[2] and len(data["meta"]["load_avg_before"]) == 3
    assert all(len(c["mae_over_lomar_time_rounds"]) == 2 for c in data["comparisons"])
    assert "time" in table and "x (per round " in table
    assert "  lomar (2 windows), 128 -> 192px: time x" in table and "expected flat" in table
    assert all(0 < c["mae_decoder_share"] < 1 for c in data["comparisons"]) and "; MAE's decoder " in table
    assert "encoder tokens an image: MAE 17, LoMaR " in table  # 128 px: 8x8 grid, a quarter visible, + [CLS]


def test_table_legend_does_not_call_the_rule_s_counts_the_paper_s():
    import io

    from lomar.bench.report import print_table

    rec = dict(method="lomar", img_size=672, windows=paper_windows(672), window_setting="paper", step_s=1.0,
               images_per_s=4.0, flops=1e9, achieved_flops=1e9, mfu=0.5, peak_mem_bytes=0, base_size=672,
               peak_mem_kind="cpu_rss_growth")
    out = io.StringIO()
    print_table([rec], [], 2e9, out)
    assert " 20p " in out.getvalue() and "else pretrain's auto rule" in out.getvalue()  # 672 px: no paper count



def test_table_legend_says_sizes_are_not_timed_side_by_side():
    """On a loaded 2-core machine LoMaR's 4 windows measured 4.5x slower at 896 px than at 448 px with the same
    FLOPs: the sizes ran a minute apart, the load changed; interleaved in one process they took the same time."""
    import io

    from lomar.bench.report import print_table

    records = [dict(method="lomar", img_size=size, windows=4, window_setting="4", step_s=1.0, images_per_s=4.0,
                    flops=1e9, achieved_flops=1e9, mfu=0.5, peak_mem_bytes=0, base_size=224,
                    peak_mem_kind="cpu_rss_growth") for size in (224, 896)]
    for rows, said in ((records, True), (records[:1], False)):
        out = io.StringIO()
        print_table(rows, [], 2e9, out)
        assert ("the sizes one after another" in out.getvalue()) is said

def test_shape_lines_set_each_series_against_what_the_claim_expects():
    from lomar.bench.report import shape

    def rec(method, size, windows, setting, step_s, flops):
        return dict(method=method, img_size=size, windows=windows, window_setting=setting, step_s=step_s, flops=flops)

    records = [rec("lomar", 224, 4, "paper", 1.0, 10), rec("mae", 224, None, "-", 1.0, 10),
               rec("lomar", 448, 9, "paper", 2.0, 22), rec("lomar", 448, 4, "fixed", 1.1, 10),
               rec("mae", 448, None, "-", 1.2, 40)]
    lines = shape(records)
    assert lines[0].startswith("  lomar (paper windows), 224 -> 448px: time x2.00, FLOPs x2.20; windows 4 -> 9")
    # 224 px's paper point is the fixed series' base: 4 windows at both sizes
    assert lines[2].startswith("  lomar (4 windows), 224 -> 448px: time x1.10, FLOPs x1.00; expected flat")
    assert lines[1].startswith("  mae, 224 -> 448px: time x1.20, FLOPs x4.00; pixels x4.00")
    assert [line.endswith(" -- time does not follow FLOPs\n") for line in lines[:3]] == [False, True, False]
    # what could make it, said once below the series however many are flagged
    assert len(lines) == 4 and lines[3].startswith("  where time does not follow FLOPs: per-step overhead")
    beit = [rec("beit", 224, None, "-", 1.0, 10), rec("beit", 448, None, "-", 1.0, 40)]  # flagged too
    # BEiT + windows' dVAE labels the whole image: its FLOPs grew x3.80 from 224 to 448 px at 2 fixed windows
    windowed = shape([rec("beit_window", 224, 2, "fixed", 1.0, 10), rec("beit_window", 448, 2, "fixed", 3.5, 38)])
    assert windowed[0].endswith("; expected flat in its encoder, its tokenizer's work with the pixels x4.00\n")
    assert sum("where time does not follow FLOPs" in line for line in shape(records + beit)) == 1


def test_table_says_when_mfu_passes_100_percent():
    """On 2 busy cores MAE's step at 224 px measured 123 % of a GEMM ceiling timed while other jobs ran."""
    import io

    from lomar.bench.report import print_table

    for mfu, said in ((1.23, True), (0.8, False)):
        out = io.StringIO()
        print_table([dict(method="mae", img_size=224, windows=None, window_setting="-", step_s=1.0, images_per_s=4.0,
                          flops=1e9, achieved_flops=1e9, mfu=mfu, peak_mem_bytes=0, base_size=224,
                          peak_mem_kind="cpu_rss_growth")], [], 2e9, out)
        assert ("MFU over 100 % (mae 224px): the GEMM timed as the ceiling" in out.getvalue()) is said


@pytest.mark.parametrize("flags", [["--windows", "50", "--sizes", "128"], ["--sizes", "100"],
                                   ["--model", "vit_nope_patch16"]])
def test_bench_rejects_bad_flags(flags, capsys):
    assert main(["bench", "--tiny", *flags]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    # ignored, each would mislead without a word: no plot written, the eager encoder timed as if compiled, ...
    (["--task", "backbone", "--plot", "b.png"], "--plot is for --task pretrain; --task backbone does not read it"),
    (["--task", "backbone", "--compile"], "--compile is for --task pretrain or --task loader; --task backbone does"),
    (["--task", "loader", "--data", ".", "--methods", "beit"], "--methods is for --task pretrain; --task loader"),
    (["--data", "."], "--data is for --task loader; --task pretrain does not read it: drop it"),
    (["--depth", "1"], "--depth is for --task backbone; --task pretrain does not read it: drop it"),
    # the later write replaced the earlier: the results JSON became the profile or the PNG
    (["--json", "r.json", "--plot", "./r.json"], "--plot ./r.json is also --json's file; give each output a file"),
    (["--json", "r.json", "--profile", "r.json"], "--profile r.json is also --json's file"),
    (["--plot", "times.txt"], "--plot times.txt: name the figure .png, .pdf or .svg"),  # not a PNG named .txt
    # MAE alone timed as if at 9 windows: the count was read by nothing
    (["--methods", "mae", "--windows", "9"], "--windows 9: --methods mae has no windows (lomar, mae_window and"),
])
def test_bench_refuses_flags_its_task_ignores_and_outputs_on_one_file(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--tiny", "--sizes", "64", "--device", "cpu", "--steps", "1", "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lomar bench: error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_plot_draws_every_method_timed(tmp_path, monkeypatch):
    """Only MAE and LoMaR were drawn: BEiT, BEiT + windows and MAE per window were timed and left off the plot."""
    from lomar.bench import report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi: figures.append(fig) or path)
    records = [dict(method=method, window_setting=setting, windows=windows, img_size=size, step_s=0.1 * size)
               for size in (224, 448)
               for method, setting, windows in (("lomar", "paper", 4), ("mae", "-", None), ("beit", "-", None),
                                                ("mae_window", "paper", 4), ("beit_window", "paper", 4))]
    report.plot_times(records, tmp_path / "p.png")
    labels = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    assert [label.split(",")[0].split(" (")[0] for label in labels] == [
        "LoMaR", "MAE", "BEiT", "MAE per 7x7 window", "BEiT + 7x7 windows"]
    assert all(len(line.get_xdata()) == 2 for line in figures[0].axes[0].get_lines())


@pytest.mark.parametrize("name, magic", [("f.png", b"\x89PNG"), ("f.pdf", b"%PDF"), ("f.SVG", b"<?xml")])
def test_figures_are_written_in_the_format_their_name_gives(tmp_path, name, magic):
    from matplotlib.figure import Figure

    from lomar.viz.reconstruction import save_figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert save_figure(fig, tmp_path / name, dpi=50).read_bytes().startswith(magic)
    with pytest.raises(ValueError, match=r"figure .*f\.txt: name it \.png, \.pdf or \.svg \(got '\.txt'\)"):
        save_figure(fig, tmp_path / "f.txt", dpi=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_shape_says_too_noisy_where_the_steps_straddle_following_flops():
    from lomar.bench.report import shape

    def rec(size, times, flops):
        return dict(method="mae", img_size=size, windows=None, window_setting="-", step_s=sorted(times)[1],
                    step_times_s=times, flops=flops)

    # the medians' x2.00 against FLOPs x1.00 alone would flag it; the steps' x1.00-x4.00 include following FLOPs
    noisy = shape([rec(224, [1.0, 1.0, 2.0], 10), rec(448, [2.0, 2.0, 4.0], 10)])
    assert noisy[0].endswith("time x2.00 (its steps x1.00-x4.00), FLOPs x1.00; pixels x4.00: expected to grow with "
                             "them or faster -- its steps' spread reaches from following FLOPs (within 50 %) to above "
                             "them: too noisy to tell; raise --steps\n")  # one edge of the band, not both sides
    assert "does not follow FLOPs" not in "".join(noisy)
    both = shape([rec(224, [1.0, 1.0, 3.0], 10), rec(448, [1.0, 2.0, 3.0], 10)])  # x0.33-x3.00: past both edges
    assert both[0].endswith(" -- its steps' spread reaches both sides of following FLOPs: too noisy to tell; raise "
                            "--steps\n")
    # every pairing of steps at least x3 from FLOPs: flagged as before
    flagged = shape([rec(224, [1.0, 1.0, 1.1], 10), rec(448, [3.3, 3.5, 3.6], 10)])
    assert flagged[0].endswith(" -- time does not follow FLOPs\n")


_SMALL = ["bench", "--tiny", "--sizes", "112", "128", "--windows", "1", "--methods", "lomar", "mae", "--batch-size",
          "1", "--steps", "1", "--warmup", "0", "--device", "cpu", "--quiet"]


@pytest.fixture
def uncounted(monkeypatch):
    """A plain step where the bench counts FLOPs (a third of these tests' time under the counter): the tests using it
    check rows, files and exit codes; the counts are the tests' above."""

    def plain_step(runner):
        runner.step()
        runner.flops = 10**6
        return runner.flops

    monkeypatch.setattr(timing.StepRunner, "count_flops", plain_step)


def test_a_bench_stopped_mid_way_leaves_its_rows_and_table(tmp_path, monkeypatch, capsys, uncounted):
    timed = timing.timed

    def stop_in_the_second_round_at_128(fn, device):  # Ctrl-C between 128 px's timed steps
        runner = getattr(fn, "__self__", None)
        if isinstance(runner, timing.StepRunner) and runner.img_size == 128 and runner.times:
            raise KeyboardInterrupt
        return timed(fn, device)

    monkeypatch.setattr(timing, "timed", stop_in_the_second_round_at_128)
    out = tmp_path / "bench.json"
    assert main([*_SMALL, "--steps", "2", "--json", str(out)]) == 130
    data = json.loads(out.read_text())
    assert [(r["method"], r["img_size"], r["status"], len(r["step_times_s"])) for r in data["records"]] == [
        ("lomar", 112, "ok", 2), ("mae", 112, "ok", 2), ("lomar", 128, "partial", 1), ("mae", 128, "partial", 1)]
    assert all(r["step_s"] > 0 and r["mfu"] > 0 for r in data["records"])
    assert data["meta"]["complete"] is False
    assert data["meta"]["left"] == [dict(method="lomar", img_size=128, windows=1),
                                    dict(method="mae", img_size=128, windows=None)]
    assert [c["img_size"] for c in data["comparisons"]] == [112, 128]
    captured = capsys.readouterr()
    assert "1 step(s): stopped" in captured.out and "MAE / LoMaR per size" in captured.out
    assert "stopped before its end" in captured.err


def test_a_failing_configuration_is_a_row_and_the_next_one_runs(tmp_path, monkeypatch, capsys, uncounted):
    built, measure = timing.build_runner, timing.StepRunner.measure_memory

    def no_lomar_at_128(method, model, size, *args, **kwargs):
        if (method, size) == ("lomar", 128):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return built(method, model, size, *args, **kwargs)

    def mae_out_of_memory(runner):
        if runner.method == "mae" and runner.img_size == 112:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        measure(runner)

    from lomar.bench import profile

    def no_profile_of_mae(runner):  # the profiler's memory: the configuration's timed row stands
        if runner.method == "mae":
            raise torch.OutOfMemoryError("CUDA out of memory (profiler)")
        return dict(shares={"gemm": 1.0}, total_ms=1.0, clock="CPU")  # a real profile: tests/bench/test_profile.py

    monkeypatch.setattr(timing, "build_runner", no_lomar_at_128)
    monkeypatch.setattr(timing.StepRunner, "measure_memory", mae_out_of_memory)
    monkeypatch.setattr(profile, "profile_step", no_profile_of_mae)
    monkeypatch.delattr("os.getloadavg")  # Windows has none: the run goes on without the load average
    out, profiles = tmp_path / "bench.json", tmp_path / "profile.json"
    assert main([*_SMALL, "--json", str(out), "--profile", str(profiles)]) == 1
    data = json.loads(out.read_text())
    rows = {(r["method"], r["img_size"]): r for r in data["records"]}
    assert {key: r["status"] for key, r in rows.items()} == {("lomar", 112): "ok", ("mae", 112): "failed",
                                                             ("lomar", 128): "failed", ("mae", 128): "ok"}
    assert rows["mae", 112]["error"] == "memory step: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows["lomar", 128]["error"] == "build: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert rows["mae", 112]["step_s"] is None and rows["mae", 128]["step_s"] > 0
    # a failure that may be a bug keeps where it was raised; running out of memory, its line alone
    assert "in no_lomar_at_128\n" in rows["lomar", 128]["traceback"] and "traceback" not in rows["mae", 112]
    assert data["meta"]["complete"] is True and data["meta"]["left"] == []
    assert data["meta"]["load_avg_before"] is None
    captured = capsys.readouterr()
    assert "mae          112     - failed at its memory step: OutOfMemoryError" in captured.out
    assert "2 of 4 configurations failed" in captured.err
    assert captured.err.count("Traceback (most recent call last)") == 1 and "in no_lomar_at_128\n" in captured.err
    assert "no profile of mae 128px: OutOfMemoryError: CUDA out of memory (profiler)" in captured.err
    assert [(p["method"], p["img_size"]) for p in json.loads(profiles.read_text())["profiles"]] == [("lomar", 112)]
    assert "time_shares" in rows["lomar", 112] and "time_shares" not in rows["mae", 128]


def test_a_sizes_runners_are_freed_before_the_next_sizes_are_built(tmp_path, monkeypatch, uncounted):
    """With --profile the profiling loop's variable kept the size's last runner (model, AdamW state, batch; on a GPU
    its memory) alive through the next size's build, memory step and timing: a larger size's peak memory counted it
    and it could run out of memory where it fits."""
    import gc
    import weakref

    from lomar.bench import profile

    built, alive_at_build = [], []

    def tracked(method, model, size, *args, **kwargs):
        gc.collect()
        alive_at_build.append((size, [(m, s) for m, s, ref in built if ref() is not None]))
        runner = build_runner(method, model, size, *args, **kwargs)
        built.append((method, size, weakref.ref(runner)))
        return runner

    monkeypatch.setattr(timing, "build_runner", tracked)
    monkeypatch.setattr(profile, "profile_step", lambda runner: dict(shares={"gemm": 1.0}, total_ms=1.0, clock="CPU"))
    assert main([*_SMALL, "--json", str(tmp_path / "bench.json"), "--profile", str(tmp_path / "profile.json")]) == 0
    assert alive_at_build == [(112, []), (112, [("lomar", 112)]), (128, []), (128, [("lomar", 128)])]


def test_a_step_that_raises_a_bug_keeps_its_traceback():
    """A shape mismatch in a method's step is a RuntimeError, as running out of memory is: it keeps its traceback."""
    runner = build_runner("mae", "vit_base_patch16", 112, None, 1, CPU, "fp32", False, tiny=True)

    def mismatched(flops=None):
        return torch.zeros(2, 3) @ torch.zeros(4, 5)

    runner.step = mismatched
    timing.interleaved_times([runner], 1, 0)
    assert runner.error.startswith("FLOP-counting step: RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert runner.trace.startswith("Traceback") and "in mismatched\n" in runner.trace and runner.model is None


def test_host_readings_fall_back_where_the_os_lacks_them(monkeypatch):
    from lomar.bench import host

    class Usage:
        ru_maxrss = 1000

    monkeypatch.setattr(host, "resource", types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: Usage))
    monkeypatch.setattr(host.sys, "platform", "darwin")
    assert host.peak_rss_bytes() == 1000  # macOS counts bytes
    monkeypatch.setattr(host.sys, "platform", "linux")
    assert host.peak_rss_bytes() == 1000 * 1024  # Linux KiB
    monkeypatch.delattr("os.getloadavg")
    assert host.load_average() is None
    monkeypatch.setattr(host, "resource", None)  # Windows: no resource module, no procfs
    monkeypatch.setattr(timing, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError(a[0])), raising=False)
    assert timing.resident_bytes() is None
    runner = build_runner("mae", "vit_base_patch16", 112, None, 1, CPU, "fp32", False, tiny=True)
    runner.measure_memory()  # the step runs, its memory unknown
    assert runner.peak_mem == (-1, "none")
    from lomar.bench import backbone

    monkeypatch.setattr(backbone, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError(a[0])), raising=False)
    monkeypatch.delattr("os.sysconf")  # Windows; macOS's lacks SC_AVPHYS_PAGES (ValueError)
    assert backbone.available_bytes("cpu") is None  # unknown: the variant runs, no estimate can skip it


def test_the_window_count_a_size_cannot_hold_is_refused_with_one_fix(capsys):
    """bench refuses the window counts lomar pretrain refuses at a size, as pretrain places windows (no two of an
    image share a top row or a left column): 20 at 224 px / patch 16 fit as distinct cells, not so."""
    for size, windows, most, grid in ((128, 30, 2, 8), (224, 20, 8, 14)):
        assert main(["bench", "--tiny", "--sizes", str(size), "--windows", str(windows), "--device", "cpu"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"lomar bench: error: {size}px: --windows {windows} asks for more 7x7 windows than fit: placed as the "
            f"original places them (no two share a top row or a left column), the {grid}x{grid} patch grid's {most} x "
            f"{most} window positions hold at most {most}; lower --windows to {most} or less, or drop {size} from "
            f"--sizes")
