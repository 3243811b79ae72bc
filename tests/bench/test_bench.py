"""``lomar bench``: a smoke run on a tiny model and what it writes (JSON rows, table, legend, shape lines, plot,
figures), and the flags it refuses. Nothing here is timed."""

import json

import pytest

from lomar.cli.app import main
from lomar.window_counts import paper_windows

REQUIRED_KEYS = {"method", "img_size", "windows", "batch_size", "step_s", "images_per_s", "flops",
                 "achieved_flops", "mfu", "peak_mem_bytes"}


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
    # MAE alone would be timed as if at 9 windows, a count nothing reads
    (["--methods", "mae", "--windows", "9"], "--windows 9: --methods mae has no windows (lomar, mae_window and"),
])
def test_bench_refuses_flags_its_task_ignores_and_outputs_on_one_file(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--tiny", "--sizes", "64", "--device", "cpu", "--steps", "1", "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lomar bench: error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_plot_draws_every_method_timed(tmp_path, monkeypatch):
    """Every method timed has its line on the plot (BEiT, BEiT + windows and MAE per window too), not only MAE's
    and LoMaR's."""
    from lomar.bench import report
    from lomar.viz import reconstruction

    figures = []  # plot_times imports the writer when it draws
    monkeypatch.setattr(reconstruction, "save_figure", lambda fig, path, dpi: figures.append(fig) or path)
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
