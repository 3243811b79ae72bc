"""The notes a run prints on stderr and the hints it gives: waiting for input, how to resume, a study's notes said
once, and the precision a run (or its resume) trains in."""

from __future__ import annotations

import json
import re

import torch
from toy_run import ToyConfig, ToyTask

from lomar.checkpoints.io import safe_load
from lomar.train.lifecycle import run
from lomar.train.precision import resolve_precision


def test_the_share_of_a_step_spent_waiting_for_input_is_logged_and_named(tmp_path, capsys):
    import time

    class SlowInput(ToyTask):
        def batches(self):
            for batch in super().batches():
                # A step of this toy takes well under a millisecond, but a busy CI machine has stalled one for
                # over 12 ms: the wait is long enough that the shares below hold through 50 ms stalls.
                time.sleep(0.5)
                yield batch

    assert run(ToyConfig(out=str(tmp_path / "slow"), epochs=1, accum_steps=1), SlowInput) == 0
    waits = [r["input_wait"] for r in map(json.loads, (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert len(waits) == 8 and all(0.8 < w <= 1 for w in waits)
    printed = capsys.readouterr()
    lines, note = printed.out.rstrip().splitlines(), printed.err.rstrip().splitlines()[-1]
    assert re.search(r"input wait (9\d|100)%", lines[1])  # the printed step lines show it too
    assert re.match(r"lomar toy: note: the input limited this run: the loop waited for batches (9\d|100)%", note)
    assert note.endswith("of a step's time (median of 7 steps); try more --workers")  # a toy has no workers
    assert lines[-1].startswith("lomar toy: done") and "input limited" not in printed.out


def test_the_input_note_needs_a_median_wait_over_the_bound():
    from lomar.train.monitor import INPUT_BOUND, input_limit_note

    def note(waits, **kwargs):
        return input_limit_note(waits, 4, **kwargs)

    assert note([0.9, 0.1, 0.1, 0.5]) is None  # the first step (workers starting) does not count
    assert note([0.0, 0.5, INPUT_BOUND, 0.1], decode="full").endswith(
        "waited for batches 20% of a step's time (median of 3 steps); try more --workers (now 4) "
        "or --decode draft (or gpu on CUDA)")
    assert "device's JPEG decoding" in note([0.0, 0.5, 0.5], decode="gpu")
    assert note([0.9]) is None and note([]) is None


def test_the_resume_hint_of_a_multi_process_run_asks_for_the_same_launch():
    """A resume checks the number of processes: the hint of a torchrun run names the same launch, not a
    single-process command."""
    from pathlib import Path

    from lomar.train.monitor import resume_hint

    assert resume_hint("pretrain", Path("runs/a"), 1) == "Resume with: lomar pretrain --out runs/a --resume auto"
    assert resume_hint("detect", Path("r"), 8) == ("Resume with the same launch (8 processes, torchrun): "
                                                   "lomar detect --out r --resume auto")
    # a folder with a space pastes as one word
    assert resume_hint("segment", Path("my runs/a"), 1) == "Resume with: lomar segment --out 'my runs/a' --resume auto"


def test_a_studys_runs_say_each_note_once_and_not_that_a_cells_evaluation_starts_anew(tmp_path, capsys,
                                                                                       monkeypatch):
    """A study's finetunes (``notes_said``: the lines it said) print their notes on stderr, which the study does not
    silence: each once a study, and (``notes_new_run`` False) no 'nothing to resume' for the --resume auto the study
    itself passes."""
    import lomar.train.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)  # bf16 emulated: the same note for every cell
    said: dict[str, None] = {}
    for cell in ("a", "b"):
        config = ToyConfig(out=str(tmp_path / cell), precision="bf16", max_steps=1, resume="auto")
        config.notes_said, config.notes_new_run = said, False  # as lomar.cli.study.evals sets them
        assert run(config, ToyTask) == 0
    noted = capsys.readouterr().err
    assert noted.count("lomar toy: note: bf16 on this CPU is emulated") == 1 and "nothing to resume" not in noted


def test_an_auto_run_resumed_where_auto_picks_another_precision_keeps_its_own_and_says_so(tmp_path, capsys,
                                                                                           monkeypatch):
    """--precision auto is resolved once, where the run starts, and recorded in its checkpoints: a resume on a CPU
    without bf16 products (an AMD CI machine) of a run begun on an AMX one goes on in bf16, and says so."""
    import lomar.train.precision as precision

    out = tmp_path / "r"
    for has_bf16, steps in ((True, 2), (False, 4)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert run(ToyConfig(out=str(out), precision="auto", max_steps=steps, resume="auto"), ToyTask) == 0
    printed = capsys.readouterr()
    assert "device cpu, precision bf16" in printed.out and "device cpu, precision fp32" not in printed.out
    # on stderr, as every note: stdout holds the run's own lines, for a program reading them
    assert ("lomar toy: note: precision bf16, the one the run trained in (this machine's --precision auto would pick "
            "fp32); pass --precision fp32 to switch\n") in printed.err and "trained in" not in printed.out
    assert safe_load(out / "last.pt")["precision"] == "bf16"


def test_bf16_asked_of_a_cpu_that_emulates_it_is_told_at_the_start(tmp_path, capsys, monkeypatch):
    """Emulated bf16 runs ~10x slower than fp32 here: the start says so; a CPU with bf16 products, or auto, is not
    told."""
    import lomar.train.precision as precision

    note = ("lomar toy: note: bf16 on this CPU is emulated (no AVX-512 BF16/AMX): expect it several times slower than "
            "fp32; --precision auto picks fp32 here\n")
    for has_bf16, setting, told in ((False, "bf16", True), (True, "bf16", False), (False, "auto", False)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert run(ToyConfig(out=str(tmp_path / f"{has_bf16}{setting}"), precision=setting, max_steps=1), ToyTask) == 0
        printed = capsys.readouterr()
        assert printed.out.startswith("lomar toy: 32 images") and "emulated" not in printed.out
        assert (printed.err[:len(note)] == note) == told == printed.err.count(note)


def test_a_precision_given_to_a_resume_switches_it_in_one_line_and_fp16s_scale_either_way(tmp_path, capsys):
    """bf16 -> fp16: the checkpoint's scaler state is empty (a disabled scaler's), which GradScaler refused with a
    traceback; fp16's scale starts afresh. fp16 -> bf16: the fp16 scale is left behind."""
    out = tmp_path / "r"
    assert run(ToyConfig(out=str(out), precision="bf16", max_steps=2), ToyTask) == 0
    assert safe_load(out / "last.pt")["scaler"] == {}
    for was, now, steps in (("bf16", "fp16", 4), ("fp16", "bf16", 6)):
        capsys.readouterr()
        assert run(ToyConfig(out=str(out), precision=now, max_steps=steps, resume="auto"), ToyTask) == 0
        extra = "; fp16's loss scale starts afresh, as a new fp16 run's" if now == "fp16" else ""
        assert (f"lomar toy: note: precision {was} → {now} after step {steps - 2}, as --precision {now} asks{extra}\n"
                in capsys.readouterr().err)
        ckpt = safe_load(out / "last.pt")
        assert ckpt["precision"] == now and bool(ckpt["scaler"]) == (now == "fp16")
    scaled = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss_scale" in r]
    assert scaled == [3, 4]


def test_an_older_checkpoint_of_a_cuda_run_resumes_on_a_cpu_saying_what_it_gets(tmp_path, capsys):
    """A checkpoint written before the precision was recorded gets this machine's auto, and the line says so; a
    device of another kind (its RNG state holds a CUDA stream: a CUDA run's) is told, not silently taken."""
    from lomar.checkpoints.io import atomic_save

    out = tmp_path / "r"
    assert run(ToyConfig(out=str(out), precision="auto", max_steps=2), ToyTask) == 0
    ckpt = safe_load(out / "last.pt")
    del ckpt["precision"]
    for state in (ckpt["rng"], *ckpt["rng_ranks"]):
        state["cuda"] = torch.zeros(16, dtype=torch.uint8)
    atomic_save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), precision="auto", max_steps=4, resume="auto"), ToyTask) == 0
    printed, own = capsys.readouterr().err, resolve_precision("auto", torch.device("cpu"))
    assert (f"lomar toy: note: precision {own}, --precision auto's choice on this machine: the checkpoint does not "
            f"record the precision the run trained in\n") in printed
    assert ("lomar toy: note: device cuda → cpu after step 2: the weights and optimizer state move over; its kernels "
            "and device random draws (drop path) differ, so it does not go on bit for bit\n") in printed


def test_bf16_asked_of_a_resume_that_trained_in_bf16_names_no_false_way_out(tmp_path, capsys, monkeypatch):
    """--precision auto keeps a resumed run's recorded bf16, so the emulated-bf16 note of a resume given
    --precision bf16 on a CPU without bf16 products must not say that auto picks fp32 there."""
    import lomar.train.precision as precision

    out = tmp_path / "r"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert run(ToyConfig(out=str(out), precision="bf16", max_steps=1), ToyTask) == 0
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), precision="bf16", max_steps=2, resume="auto"), ToyTask) == 0
    printed = capsys.readouterr().err
    assert ("lomar toy: note: bf16 on this CPU is emulated (no AVX-512 BF16/AMX): expect it several times slower "
            "than fp32\n") in printed and "auto picks" not in printed
