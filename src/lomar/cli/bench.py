"""``lomar bench``: LoMaR vs MAE training-step cost across image sizes, on this machine.

For every image size it builds one LoMaR per window setting and one MAE, warms them up and
times full training steps (forward, backward, AdamW) interleaved A B A B … in one process,
reporting medians, FLOPs counted by ``torch.utils.flop_counter`` and the share of a large
GEMM's FLOP/s (measured in the same run, same dtype) the step achieves.

Window settings: ``paper`` uses the paper's windows per image, 4 at 224 px, 6 at 384 and 9 at
448, and ``--windows auto``'s rule at other sizes (:func:`lomar.window_counts.paper_windows`: linear in
the grid's area between those points, in proportion to it outside, e.g. 20 at 672 and 36 at 896).
An integer N uses N windows at every size: LoMaR's cost is then independent of the image size.

``--task loader`` times images/s per loader worker next to the model's step rate
(:mod:`lomar.bench.loader`); ``--make-test-set KIND`` first writes a realistic JPEG test set from the
demo photographs into ``--data``. ``--task backbone``: :mod:`lomar.bench.backbone_plan`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lomar.bench.host import load_average
from lomar.cli.bench_plan import patch_size, plan_configurations
from lomar.cli.common import check_output_file, resolve_device, write_json
from lomar.errors import UsageError
from lomar.limits import MAX_IMG_SIZE
from lomar.methods import names
from lomar.train import settings as S
from lomar.train.runtime import retain_freed_memory
from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting
from lomar.values import command_line

__all__ = ["add_arguments", "run"]

def _window_setting(text: str) -> str | int:
    if text == "paper":
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected 'paper' or a window count, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"window count must be positive, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Example (a few minutes on an idle 2-core CPU): "
                     "lomar bench --model vit_base_patch16 --batch-size 4 "
                     "--sizes 224 448 --steps 3 --json bench.json --plot bench.png")
    add_settings(parser, {
        "model": S.MODEL,
        "sizes": Setting([224, 384, 448, 672, 896], "image sizes", kind=int, above=0, high=MAX_IMG_SIZE, nargs="+",
                          metavar="PX"),
        "methods": Setting(["lomar", "mae"], "beit times BEiT and BEiT + 7x7 windows (beit_window); mae_window: MAE "
                           "per 7x7 window; windowed variants use LoMaR's window counts", kind=str, nargs="+",
                           choices=(*names(), "mae_window")),
        "windows": Setting(["paper"], "LoMaR windows per image: 'paper' (4@224, 6@384, 9@448; elsewhere pretrain's "
                           "--windows auto rule, e.g. 20@672) and/or fixed counts, e.g. --windows paper 4", kind=str,
                           parse=_window_setting, nargs="+",
                           metavar="N|paper"),
        "batch_size": S.BATCH_SIZE.but(default=4, help="images per training step"),
        "precision": S.PRECISION.but(default="fp32", help="fp32, or autocast to bf16/fp16 (fp16 with a gradient "
                                     "scaler); auto = bf16 where the hardware has bf16 products, as in pretrain"),
        "compile": S.COMPILE.but(help="torch.compile each model"),
        "compile_mode": S.COMPILE_MODE,
        "device": S.DEVICE,
        "threads": S.THREADS.but(help="CPU threads (default: torch's choice)"),
        "steps": Setting(3, "timed steps per configuration (median)", above=0),
        "warmup": Setting(1, "plain untimed steps per configuration before timing (after one FLOP-counting and one "
                          "memory step)", low=0),
        "json": S.JSON.but(help="write results as JSON, rewritten after every timed round and marked complete at the "
                           "end (default: not written)"),
        "plot": Setting(None, "plot time per step against image size into a .png, .pdf or .svg (default: no plot)",
                        kind=str, metavar="FILE.png"),
        "profile": Setting(None, "after timing, profile one step per configuration and write where its time goes "
                           "(matrix products, attention, fused kernels, optimizer, other; the longest kernels) to "
                           "this JSON (default: no profile)", kind=str, metavar="FILE"),
        "quiet": Setting(False, "no progress lines"),
        "tiny": Setting(False, argparse.SUPPRESS),  # tests: width 32, depth 1
        "task": Setting("pretrain", "pretrain: training steps per method; loader: images/s per loader worker from "
                        "real files next to the model's step rate; backbone: forward + backward of the encoder alone "
                        "per --attention variant", choices=("pretrain", "loader", "backbone")),
        "attention": Setting(["dense", "chunked"], "backbone task: attention variants", kind=str, nargs="+",
                             choices=("auto", "dense", "chunked", "flex", "windowed")),
        "encoders": Setting(["lomar"], "backbone task: encoders timed side by side: lomar (iRPE), mae (absolute "
                            "table), mae+decomposed / mae+bias (with the relative position term detect / segment "
                            "add)", kind=str, nargs="+", choices=("lomar", "mae", "mae+decomposed", "mae+bias")),
        "grad_checkpointing": Setting(False, "backbone task: recompute each block in the backward pass"),
        "depth": S.DEPTH.but(help="backbone task: override the model's number of blocks, for a quick per-block "
                             "measurement (default: the model's)"),
    })
    add_settings(parser, {  # the loader task's own flags; it shares --sizes, --model, --batch-size and the rest
        "data": S.DATA.but(help="folder (or .txt list) of images to load (default: none; --task loader needs it)"),
        "workers": S.WORKERS.but(default=1, help="loader worker processes (0: main process)"),
        "images": Setting(64, "images loaded per measurement", above=0),
        "decode": S.DECODE.but(default=["full"], nargs="+", help="full: reference path; draft: reduced-size JPEG "
                               "decoding; windows: draft + only the plan's windows resampled (LoMaR); gpu is not a "
                               "loader path"),
        "loader_method": Setting("lomar", "whose masking plan the workers draw", choices=("lomar", "mae")),
        "loader_windows": Setting("paper", "LoMaR windows per image: 'paper' (pretrain's --windows auto at each "
                                  "size: 4@224, 9@448, 36@896 with 16 px patches) or a count at every size", kind=str,
                                  parse=_window_setting, metavar="N|paper"),
        "make_test_set": Setting(None, "first write --test-set-count JPEGs of this kind into --data (default: none)",
                                 kind=str, choices=("camera", "imagenet")),
        "test_set_count": Setting(32, "JPEGs in a made test set", above=0),
        "repeats": Setting(1, "loader measurements per setting (median)", above=0),
        "no_model": Setting(False, "measure the loader only"),
    }, group="--task loader")


# Besides the flags every task reads (the model, sizes, batch, precision, device, threads, steps, --json):
# a flag of another task is refused: ignored, it would mislead (--task backbone --compile would time the
# eager encoder).
_TASK_FLAGS = {
    "pretrain": {"methods", "windows", "compile", "compile_mode", "plot", "profile"},
    "backbone": {"attention", "encoders", "grad_checkpointing", "depth"},
    "loader": {"compile", "compile_mode", "data", "workers", "images", "decode", "loader_method", "loader_windows",
               "make_test_set", "test_set_count", "repeats", "no_model"},
}


def _check_task_flags(args: argparse.Namespace) -> None:
    """A flag changed from its default that ``--task`` does not read, or two outputs on one file: UsageError."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    others = set().union(*_TASK_FLAGS.values()) - _TASK_FLAGS[args.task]
    for name in sorted(others):
        if getattr(args, name) != defaults[name]:
            readers = " or ".join(f"--task {task}" for task, flags in _TASK_FLAGS.items() if name in flags)
            raise UsageError(f"--{name.replace('_', '-')} is for {readers}; --task {args.task} does not read it: "
                             f"drop it")
    outputs: dict[Path, str] = {}
    for flag in ("json", "plot", "profile"):
        if getattr(args, flag):
            path = Path(getattr(args, flag)).resolve()
            if path in outputs:  # the later write would replace the earlier one's results
                raise UsageError(f"--{flag} {getattr(args, flag)} is also --{outputs[path]}'s file; give each "
                                 f"output a file of its own")
            outputs[path] = flag


def _start(args: argparse.Namespace):
    """(the torch device of --device, the progress printer, what every JSON's meta holds); resolves --precision
    and applies --threads."""
    import torch

    from lomar.train.precision import resolve_precision  # torch: not for --help

    device = torch.device(resolve_device(args.device))
    args.precision = resolve_precision(args.precision, device)
    if args.threads:  # the command owns the process: setting torch's global thread count is its call
        torch.set_num_threads(args.threads)
    say, command = _say_and_command(args)
    return device, say, dict(command=command, torch=torch.__version__, threads=torch.get_num_threads())


def _say_and_command(args: argparse.Namespace):
    """(the progress printer, the command line the JSON's meta records)."""
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    # the JSON's record of the command, to run again as it ran: a path with a space stays one argument
    command = command_line("lomar", "bench", *sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" else None
    return say, command


def _write(args: argparse.Namespace, say, **result) -> None:
    if args.json:
        write_json(args.json, result)
        say(f"wrote {args.json}")


def run(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json", create_parents=True, example="bench.json")
    S.check_compile_mode(args)
    if args.profile and args.task != "pretrain":
        raise UsageError(f"--profile profiles training steps, which --task {args.task} does not time; "
                         f"drop --profile or use --task pretrain")
    _check_task_flags(args)
    if args.task == "backbone":
        return _run_backbone(args)
    if args.task == "loader":
        return _run_loader(args)
    check_output_file(args.plot, "--plot", create_parents=True, example="bench.png")  # before torch's seconds
    check_output_file(args.profile, "--profile", create_parents=True, example="profile.json")
    from lomar.viz.reconstruction import FIGURE_FORMATS  # torch: not for --help

    if args.plot and Path(args.plot).suffix.lower() not in FIGURE_FORMATS:  # else a PNG under any name
        raise UsageError(f"--plot {args.plot}: name the figure .png, .pdf or .svg")
    plan = plan_configurations(args)
    import torch

    from lomar.bench import report  # torch: not for --help
    from lomar.bench.results import Results  # torch: not for --help
    from lomar.bench.timing import GemmCeiling, build_runner, interleaved_times  # torch: not for --help

    device, say, meta = _start(args)
    retained = device.type == "cpu" and retain_freed_memory()
    # every row's own settings (a row read alone still says how it was timed), also the meta's
    common = dict(batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                  compile_mode=args.compile_mode, device=str(device))
    meta.update(model=args.model, **common, steps=args.steps, warmup=args.warmup, load_avg_before=load_average(),
                timed="training steps (forward + backward + AdamW update)",
                order="one size's configurations alternating round by round", machine=report.machine_name(device),
                malloc_retains_memory=retained)
    say(f"{args.model}, batch {args.batch_size}, {args.precision}, {device}, "
        f"{torch.get_num_threads()} threads, sizes {list(plan)}")
    gemm = GemmCeiling(device, args.precision, 256 if args.tiny else None)
    results = Results(plan, args.steps, gemm, meta, common, lambda result: _write(args, lambda msg: None, **result))
    profiles: list[dict] = []
    unprofiled: list[str] = []  # configurations timed whose profiled step failed
    traces: list[str] = []  # their failures' tracebacks, where one may be a bug
    try:
        for size in plan:
            runners = results.build(size, lambda method, px, windows: build_runner(
                method, args.model, px, windows, args.batch_size, device, args.precision, args.compile,
                tiny=args.tiny, compile_mode=args.compile_mode))
            interleaved_times(runners, args.steps, args.warmup, gemm, say, on_change=results.save)
            shares = _profiled(runners, size, profiles, unprofiled, traces) if args.profile else {}
            for row in results.end_size():
                if (row["method"], row["windows"]) in shares:
                    row["time_shares"] = shares[row["method"], row["windows"]]
            del runners
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except BaseException:  # Ctrl-C, SIGTERM, an error of the bench itself: what was measured is kept and shown
        _report(results.save(), profiles)
        if args.json:
            print(f"[bench] stopped before its end: {args.json} holds the rows measured (meta.complete false, "
                  f"meta.left: what was left to run)", file=sys.stderr, flush=True)
        raise
    result = results.save(complete=True)
    if args.json:
        say(f"wrote {args.json}")
    _report(result, profiles)
    if args.profile:
        write_json(args.profile, dict(meta=result["meta"], profiles=profiles))
        say(f"wrote {args.profile}")
    measured = [row for row in result["records"] if row["step_s"] is not None]
    if args.plot and measured:
        report.plot_times(measured, args.plot, f"{args.model}, batch {args.batch_size}, {args.precision}, "
                          f"{meta['machine']}")
        say(f"wrote {args.plot}")
    if failed := [row for row in result["records"] if row["status"] == "failed"]:
        # the others' rows stand; a script or a user comparing the table still learns it lacks these
        print(f"lomar bench: {len(failed)} of {len(result['records'])} configurations failed: "
              + "; ".join(f"{r['method']} {r['img_size']}px: {r['error']}" for r in failed), file=sys.stderr)
    if unprofiled:
        print(f"lomar bench: no profile of {'; '.join(unprofiled)}", file=sys.stderr)
    for trace in [*(row["traceback"] for row in failed if "traceback" in row), *traces]:  # where to debug it
        print(trace, end="", file=sys.stderr)
    return 1 if failed or unprofiled else 0


def _profiled(runners: list, size: int, profiles: list[dict], unprofiled: list[str], traces: list[str]) -> dict:
    """{(method, windows): time shares} of one profiled step of each of a size's runners that timed, its record
    appended to ``profiles``; a profile that fails is a line in ``unprofiled`` (its traceback, where one may be a bug,
    in ``traces``). A function of its own: run's loop variable would keep the size's last runner (model, AdamW state,
    batch; on a GPU, its memory) alive through the next size's build, memory step and timing."""
    from lomar.bench.profile import profile_step  # torch: not for --help
    from lomar.bench.timing import failure  # torch: not for --help

    shares = {}
    for r in runners:
        if r.error is not None:
            continue
        try:
            profiles.append(dict(method=r.method, img_size=size, windows=r.windows, **profile_step(r)))
        except RuntimeError as exc:  # the profiler's own memory, say: the timed rows stand, and the rest
            line, trace = failure(exc)
            unprofiled.append(f"{r.method} {size}px: {line}")
            traces.extend(filter(None, [trace]))
            continue
        shares[r.method, r.windows] = profiles[-1]["shares"]
    return shares


def _report(result: dict, profiles: list[dict]) -> None:
    """The pretrain task's table (and profile shares) on stdout, from a results file's content."""
    from lomar.bench import report  # torch: not for --help

    meta = result["meta"]
    print(report.describe(meta))
    report.print_table(result["records"], result["comparisons"], meta["gemm_flops"], sys.stdout,
                       result["beit_comparisons"], meta["gemm_flops_by_library"])
    for prof in profiles:
        shares = ", ".join(f"{kind} {100 * share:.0f} %" for kind, share in prof["shares"].items())
        print(f"{prof['method']} {prof['img_size']}px: {shares} of {prof['total_ms']:.1f} ms {prof['clock']} time")


def _run_backbone(args: argparse.Namespace) -> int:
    """``--task backbone``: see :mod:`lomar.bench.backbone_plan`."""
    patch = patch_size(args)
    if bad := [s for s in args.sizes if s <= 0 or s % patch]:
        raise UsageError(f"--sizes {bad}: sizes must be positive multiples of the patch size {patch}")
    from lomar.bench.backbone_plan import bench_backbone, format_table  # its planner's code: not for --help
    from lomar.bench.report import describe, machine_name  # its table's code: not for --help

    # The children time the steps, each importing torch: this process imports it (seconds) only where the hardware
    # decides, --device auto or cuda (is it there, its free memory) or --precision auto; the meta's torch, threads
    # and machine are otherwise the first child's.
    if args.device == "cpu" and args.precision != "auto":
        device, (say, command) = "cpu", _say_and_command(args)
        meta = dict(command=command, torch=None, threads=None, machine=None)
    else:
        torch_device, say, meta = _start(args)
        device, meta["machine"] = str(torch_device), machine_name(torch_device)
    started = time.perf_counter()
    meta.update(task="backbone", model=args.model, depth=args.depth, batch_size=args.batch_size,
                precision=args.precision, device=device, steps=args.steps, warmup=args.warmup,
                grad_checkpointing=args.grad_checkpointing, load_avg_before=load_average(),
                timed="forward + backward passes of the encoder alone (no head, no optimizer)",
                order="each in a process of its own, one after another (not interleaved)")

    def runtime(child: dict) -> None:
        if meta["machine"] is None:
            meta.update(child)

    def save(records: list[dict], done: bool = False) -> None:
        """After every record, so a long run that is stopped keeps what it measured."""
        meta.update(load_avg_after=load_average(), wall_s=time.perf_counter() - started, complete=done)
        _write(args, say if done else lambda msg: None, meta=meta, records=records)

    records = bench_backbone(args.model, args.sizes, args.attention, args.batch_size, args.grad_checkpointing,
                             device, args.precision, args.steps, args.warmup, args.threads, args.tiny, say=say,
                             on_record=save, depth=args.depth, encoders=args.encoders, on_runtime=runtime)
    if meta["machine"] is None:  # no child ran (every variant skipped): read here what a CPU child would report
        meta.update(_cpu_runtime(args.threads))
    meta.update(load_avg_after=load_average())
    print(describe(meta))
    print(format_table(records))
    save(records, done=True)
    return 0


def _cpu_runtime(threads: int | None) -> dict:
    """torch's version and thread count (``--threads`` applied) and the CPU's name, as a backbone child says them."""
    import torch  # only where no child ran to say them: the torch-free planner's other runs never pay its import

    from lomar.bench.report import machine_name  # the table's code: not for --help

    if threads:  # the command owns the process: setting torch's global thread count is its call
        torch.set_num_threads(threads)
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=machine_name(torch.device("cpu")))


def _run_loader(args: argparse.Namespace) -> int:
    """``--task loader``: see :mod:`lomar.bench.loader`."""
    if args.data is None:
        raise UsageError("--task loader needs --data DIR (a folder of images; add --make-test-set camera to "
                         "create one)")
    if "gpu" in args.decode:
        raise UsageError("--decode gpu decodes in the training loop, not in loader workers; use full, draft or windows")
    args.data = Path(args.data)
    if not (args.make_test_set or args.data.exists()):  # before _start imports torch (seconds)
        raise UsageError(f"--data {args.data} does not exist; pass a folder of images or add --make-test-set")
    device, say, meta = _start(args)
    from lomar.bench.loader import measure_loader, share_model_rate  # torch: not for --help
    from lomar.bench.testset import make_test_set  # Pillow and process pools: not for --help

    if args.make_test_set:
        try:
            make_test_set(args.data, args.make_test_set, args.test_set_count)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        say(f"test set: {args.test_set_count} {args.make_test_set} JPEGs in {args.data}")
    if not args.data.exists():
        raise UsageError(f"--data {args.data} does not exist; pass a folder of images or add --make-test-set")
    records = []
    for decode in args.decode:
        try:
            records += measure_loader(
                args.data, list(dict.fromkeys(args.sizes)), args.workers, args.loader_method,
                args.loader_windows, decode, args.images, args.batch_size, args.model, device=device,
                precision=args.precision, compile=args.compile, compile_mode=args.compile_mode, steps=args.steps,
                warmup=args.warmup, model_rate=not args.no_model and not records, tiny=args.tiny,
                repeats=args.repeats, progress=say)
        except ValueError as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
    share_model_rate(records)
    out = sys.stdout
    out.write(f"{'px':>5} {'decode':>7} {'img/s/worker':>13} {'CPU ms/img':>11} {'loader img/s':>13} "
              f"{'model img/s':>12}  limited by\n")
    for r in records:
        model = "-" if r["model_images_per_s"] is None else f"{r['model_images_per_s']:.1f}"
        out.write(f"{r['img_size']:>5} {r['decode']:>7} {r['images_per_s']:>13.1f} {r['cpu_ms_per_image']:>11.1f} "
                  f"{r['loader_images_per_s']:>13.1f} {model:>12}  {r['limited_by'] or '-'}\n")
    _write(args, say, meta=meta, records=records)
    return 0
