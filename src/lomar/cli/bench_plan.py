"""``lomar bench``'s pretrain task: the configurations it times, per image size, checked before any work: every window
count fits its size's patch grid as `lomar pretrain` places windows (it refuses the same counts), and the fix of one
that does not is said in bench's own flags."""

from __future__ import annotations

import argparse

from lomar.errors import UsageError, in_flags
from lomar.methods import names
from lomar.window_counts import paper_windows

__all__ = ["patch_size", "plan_configurations"]


def patch_size(args: argparse.Namespace) -> int:
    """The patch size of ``--model`` (every task's sizes are checked against its grid)."""
    from lomar.models.vit_config import model_config  # the model table: not for --help

    try:
        return model_config(args.model).patch_size
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None


def plan_configurations(args: argparse.Namespace) -> dict[int, list[tuple[str, int | None, str]]]:
    """Per size: (method, windows, setting) configurations, validated before any work."""
    from lomar.bench.timing import method_config  # torch: not for --help
    from lomar.models.masking import WindowsDoNotFit, grid_size  # torch: not for --help

    patch = patch_size(args)
    if args.windows != ["paper"] and not {"lomar", "mae_window", "beit"} & set(args.methods):  # else unused
        raise UsageError(f"--windows {' '.join(map(str, args.windows))}: --methods {' '.join(args.methods)} has no "
                         f"windows (lomar, mae_window and beit's beit_window do): drop --windows or add lomar")
    paper = "paper" in args.windows
    plan: dict[int, list[tuple[str, int | None, str]]] = {}
    for size in dict.fromkeys(args.sizes):
        try:
            grid = grid_size(size, patch)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        lomar: dict[int, str] = {}  # windows -> setting; the first setting of a count wins
        for setting in args.windows if "lomar" in args.methods else ():
            lomar.setdefault(paper_windows(size, patch, 7) if setting == "paper" else setting,
                             "paper" if setting == "paper" else "fixed")
        windowed = paper_windows(size, patch, 7) if paper else args.windows[0]
        configs = [("lomar", n, setting) for n, setting in lomar.items()]
        configs += [(m, None, "-") for m in names()[1:] if m in args.methods]  # every method but LoMaR: global
        configs += [(m, windowed, "paper" if paper else "fixed") for m, flag in
                    (("mae_window", "mae_window"), ("beit_window", "beit")) if flag in args.methods]
        for method, n, _ in (c for c in configs if c[1] is not None):
            variant, config = method_config(method, size, n)  # the config build_runner times
            try:  # pretrain's own check of it: its window placement, a method's masks
                variant.validate(config, grid)
            except ValueError as exc:  # bench's windows are 7x7 patches: the fix is the size or the count
                if min(grid) < 7:
                    raise UsageError(f"{size}px: bench's 7x7 windows do not fit its {grid[0]}x{grid[1]} patch grid; "
                                     f"drop {size} from --sizes (the least is {7 * patch})") from None
                if not isinstance(exc, WindowsDoNotFit) or exc.most is None:  # the message's own fix stands
                    raise UsageError(f"{size}px: {in_flags(str(exc), {'num_windows': '--windows'})}") from None
                message = in_flags(exc.detail, {"num_windows": "--windows"})  # its fix in bench's terms, once
                raise UsageError(f"{size}px: {message}; lower --windows to {exc.most} or less, or drop {size} from "
                                 f"--sizes") from None
        plan[size] = configs
    return plan
