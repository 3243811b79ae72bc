"""The pretraining engine's schedule: warm-up then cosine (over epochs or steps, BEiT's linspace warm-up of whole
steps, rounded half up), the warm-up warnings, a --min-lr above the peak refused, and the weight-decay groups."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import TINY
from lomar.cli.app import main
from lomar.lr_schedule import lr_at, lr_at_whole_steps
from lomar.models.lomar import LoMaR
from lomar.models.vit import model_config
from lomar.train.schedule import param_groups, schedule_span, warmup_warning


def test_lr_schedule_warmup_then_cosine():
    total, warmup = schedule_span(steps_per_epoch=10, epochs=10, warmup_epochs=2)
    kw = dict(total_steps=total, warmup_steps=warmup, base_lr=1.0, min_lr=0.1)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(10, **kw) == pytest.approx(0.5)  # half-way through warm-up
    assert lr_at(20, **kw) == pytest.approx(1.0)  # peak
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(1000, **kw) == pytest.approx(0.1)  # past the end: stays at min_lr
    values = [lr_at(s, **kw) for s in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_a_schedule_over_steps_keeps_the_recipes_warmup_share():
    """400 epochs with 40 of warm-up, laid over 20 steps: 2 warm-up steps, the peak at step 2."""
    total, warmup = schedule_span(steps_per_epoch=7, epochs=400, warmup_epochs=40, schedule_steps=20)
    assert (total, warmup) == (20, 2)
    lrs = [lr_at(s, total, warmup, base_lr=1.0) for s in range(20)]
    assert lrs[2] == max(lrs) == 1.0 and lrs[1] == 0.5 and lrs[-1] < 0.01


def test_a_warmup_in_steps_is_laid_over_the_schedule_steps_or_the_epochs_and_cut_to_them():
    """detect's and segment's --warmup-steps: the schedule spans --schedule-steps if given, else --epochs' steps."""
    from types import SimpleNamespace

    from lomar.train.schedule import run_span

    def span(**settings):
        return run_span(SimpleNamespace(**{"epochs": 3, "schedule_steps": None, **settings}), steps_per_epoch=100)

    assert span(warmup_steps=50, schedule_steps=1000) == (1000.0, 50.0)
    assert span(warmup_steps=50) == (300.0, 50.0)
    assert span(warmup_steps=5000, schedule_steps=1000) == (1000.0, 1000.0)
    assert span(warmup_steps=None, warmup_epochs=1) == (300.0, 100.0)


def test_beits_schedule_is_its_linspace_warmup_then_the_same_cosine():
    """BEiT's cosine_scheduler: linspace(0, base, W) over the first W steps (the peak at step W - 1),
    then final + (base - final)(1 + cos(pi i / (T - W))) / 2 for i = step - W."""
    total, warmup, base, final = 50, 8, 1.5e-3, 1e-5
    expected = np.concatenate([np.linspace(0, base, warmup),
                               final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total - warmup)
                                                                          / (total - warmup)))])
    ours = [lr_at_whole_steps(s, total, warmup, base, final) for s in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)
    assert ours[warmup - 1] == base and lr_at(warmup - 1, total, warmup, base, final) < base  # MAE's peaks at W
    assert [lr_at_whole_steps(s, 10, 1, 1.0) for s in range(2)] == [0.0, 1.0]  # linspace(0, base, 1) is [0]


@pytest.mark.parametrize("warmup, steps", [(2.5, 3), (4.5, 5), (3.5, 4), (3.49, 3)])
def test_beits_fractional_warm_up_is_rounded_half_up_to_whole_steps(warmup, steps):
    """A warm-up of no whole number of steps (a schedule laid over --schedule-steps keeps the recipe's warm-up
    share) is rounded half up, never to even; the cosine follows from the rounded step, as MAE's after its warm-up."""
    lrs = [lr_at_whole_steps(s, 100, warmup, 1.0) for s in range(steps + 1)]
    assert lrs[:steps] == pytest.approx([s / (steps - 1) for s in range(steps)], abs=1e-15)  # peaks at step n - 1
    assert lrs[steps] == lr_at(steps, 100, steps, 1.0)


def test_the_warmup_warning_follows_the_runs_schedule():
    # steps 0-3 of MAE's: 0.6 at step 3 (0-based), the run's step 4
    assert "rises only to 0.6, at its last step, short of the peak lr 1;" in warmup_warning(4, 100, 5, 1.0)
    assert warmup_warning(5, 100, 5, 1.0) is None  # a run that ends with its warm-up is not warned
    assert warmup_warning(8, 100, 8.4, 1.0, schedule=lr_at_whole_steps) is None  # 8 whole steps: the peak at 7
    assert warmup_warning(5, 100, 5, 1.0, schedule=lr_at_whole_steps) is None  # BEiT's peaks at step 4
    assert "rises only to 0.75," in warmup_warning(4, 100, 5, 1.0, schedule=lr_at_whole_steps)


def test_the_warmup_warning_names_the_setting_that_made_the_warm_up():
    from types import SimpleNamespace

    detect = SimpleNamespace(warmup_steps=250, schedule_steps=None)  # detect, segment: no --warmup-epochs
    assert warmup_warning(10, 1000, 250, 1.0, config=detect).endswith("lower --warmup-steps to at most --max-steps")
    given = SimpleNamespace(schedule_steps=400)
    assert "lower --schedule-steps" in warmup_warning(2, 400, 40, 1.0, config=given)
    assert "pass --max-steps 41 or more" in warmup_warning(2, 400, 40.5, 1.0, config=given, resumed=True)
    assert "drop --epochs" in warmup_warning(2, 400, 40, 1.0, config=SimpleNamespace(schedule_steps=None))
    # epochs and warmup_epochs from a --config file: the fix named flags the user had not given
    in_file = SimpleNamespace(schedule_steps=None, in_file={"epochs": "my.yaml", "warmup_epochs": "my.yaml"})
    assert warmup_warning(2, 400, 40, 1.0, config=in_file).endswith(
        "drop epochs from my.yaml to lay the schedule over --max-steps, or lower warmup_epochs in my.yaml")


def test_a_warm_up_cut_to_the_schedule_is_said_with_both_lengths():
    """run_span cuts --warmup-steps to the schedule (1500 in a 200-step run): the whole run warms up, never decays."""
    from types import SimpleNamespace

    segment = SimpleNamespace(warmup_steps=1500, schedule_steps=None)
    said = warmup_warning(200, 200, 200, 1.0, config=segment)  # it ends with its (cut) warm-up: 0.995 at step 199
    assert said.startswith("--warmup-steps 1500 is longer than this run's 200-step lr schedule") and \
        "rises only to 0.995, at its last step, short of the peak lr 1;" in said and \
        said.endswith("lower --warmup-steps below 200 (e.g. 20)")
    assert warmup_warning(1, 1, 1, 1.0, config=segment).endswith("below 1 (e.g. 0)")  # 0: no warm-up, a valid fix
    # --max-steps 50 in a 1000-step schedule: the fix must end the warm-up before the run stops, not the schedule
    longer = SimpleNamespace(warmup_steps=1500, schedule_steps=1000)
    said = warmup_warning(50, 1000, 1000, 1.0, config=longer)
    assert said.endswith("never decays, and this run stops at step 50: the lr rises only to 0.049, at its last step, "
                         "short of the peak lr 1; lower --warmup-steps below 50 (e.g. 5)"), said
    assert warmup_warning(50, 1000, 5, 1.0, config=SimpleNamespace(warmup_steps=5, schedule_steps=1000)) is None
    assert warmup_warning(200, 200, 200, 1.0, config=SimpleNamespace(warmup_steps=200)) is None  # as asked
    assert warmup_warning(200, 200, 200, 1.0, config=segment, resumed=True) is None  # told at its start


def test_decay_groups_follow_the_original_rule():
    model = LoMaR(model_config("vit_tiny_patch16", depth=1, img_size=112), 7, 1)
    no_decay, decay = param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"mask_token", "encoder.cls_token", "encoder.blocks.0.attn.rpe.table"} <= decayed
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in skipped)
    assert "encoder.blocks.0.norm1.weight" in skipped and "head.bias" in skipped
    assert len(decayed) + len(skipped) == len(names)



def test_a_min_lr_above_the_peak_lr_that_blr_gives_is_refused(tmp_path, image_dir, capsys, no_run_figures):
    """--min-lr above --lr is refused, but with the lr from --blr (1e-3 x 4 / 256 here) nothing compared them: the
    'cosine' rose from the peak to --min-lr 0.5 and the run diverged (loss 1.9 -> 127 in 6 steps)."""
    i = TINY.index("--lr")
    flags = [*TINY[:i], *TINY[i + 2:], "--data", str(image_dir), "--blr", "1e-3"]
    assert main(["pretrain", *flags, "--out", str(tmp_path / "a"), "--min-lr", "0.5", "--max-steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lomar pretrain: error: --min-lr 0.5 is above the peak lr 1.56e-05 (--blr 0.001 x effective batch / 256): "
        "the lr would rise to it; lower --min-lr or raise --blr")
    assert not (tmp_path / "a").exists()
    assert main(["pretrain", *flags, "--out", str(tmp_path / "b"), "--min-lr", "1e-6", "--max-steps", "2"]) == 0
