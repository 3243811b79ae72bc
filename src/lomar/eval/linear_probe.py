"""Linear probe on frozen features: BatchNorm + linear (:class:`~lomar.models.probe_classifier.LinearProbe`), trained on
cached features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lomar.checkpoints.kinds import LINPROBE_FORMAT
from lomar.lr_schedule import lr_at
from lomar.models.probe_classifier import LinearProbe, ProbeClassifier
from lomar.models.spec import model_spec
from lomar.progress_bar import progress

__all__ = ["LARS", "train_linear_probe", "train_mae_linear_probe", "probe_checkpoint"]


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       epochs: int = 90, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 0.0,
                       seed: int = 0) -> tuple[LinearProbe, float]:
    """Train the probe on cached features; returns (probe, val top-1 in [0, 1]).

    MAE trains its probe with LARS at batch 16384 through the frozen encoder with light
    augmentation. Here features are computed once (centre crops) and the probe, a convex
    problem, is trained with AdamW and a per-step cosine schedule: same model, orders of
    magnitude cheaper, slightly lower numbers than with augmentation.
    """
    total = epochs * max(1, train_x.shape[0] // batch_size)
    return _fit(train_x, train_y, val_x, val_y, epochs, batch_size, seed,
                lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
                lambda step, t: lr_at(step, total, 0, lr), f"lr (now {lr:g})")


def _fit(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, epochs: int,
         batch_size: int, seed: int, make_opt, lr_at, rate: str) -> tuple[LinearProbe, float]:
    """Train a fresh probe with ``make_opt(params)``, setting ``lr_at(step, fractional epoch)`` before each
    step; returns (probe, val top-1 in [0, 1]). ValueError naming ``rate`` (the setting to lower) when the
    probe diverged: its NaN logits would score a top-1 all the same."""
    if train_x.shape[0] < 2:
        raise ValueError("the linear probe needs at least 2 training images (BatchNorm statistics)")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = int(max(train_y.max(), val_y.max())) + 1
    probe = LinearProbe(train_x.shape[1], classes)
    opt = make_opt(probe.parameters())
    per_epoch = max(1, train_x.shape[0] // batch_size)
    probe.train()
    for epoch in progress(range(epochs), desc="linear probe", unit="epoch"):
        order = torch.randperm(train_x.shape[0], generator=gen)
        # Equal batches (the ragged tail joins the last one): BatchNorm needs > 1 sample.
        for i, idx in enumerate(order.tensor_split(per_epoch)):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * per_epoch + i, epoch + i / per_epoch)
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            try:
                opt.step()
            except RuntimeError as exc:  # an lr past float32's range: the step size itself is no number
                if "overflow" not in str(exc):
                    raise
                raise ValueError(f"the linear probe's step overflowed float32 (the update is lr x a gradient over "
                                 f"3.4e38); lower {rate}") from None
    if not all(bool(torch.isfinite(value).all()) for value in probe.state_dict().values() if value.is_floating_point()):
        raise ValueError(f"the linear probe diverged: its weights hold NaN or inf after {epochs} epochs; lower {rate}")
    probe.eval()
    with torch.no_grad():
        accuracy = int((probe(val_x).argmax(1) == val_y).sum()) / len(val_y)  # one division: 3 of 10 is 0.3
    return probe, accuracy


class LARS(torch.optim.Optimizer):
    """MAE's LARS (util/lars.py): SGD with momentum whose update of every matrix is scaled by the trust
    ratio 0.001·|w|/|g + wd·w|; vectors (biases) take the plain momentum step."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm, one)
                    q = torch.where(param_norm > 0.0, trust, one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def train_mae_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                           epochs: int = 90, batch_size: int = 256, blr: float = 0.1, warmup_epochs: float = 10,
                           seed: int = 0) -> tuple[LinearProbe, float]:
    """MAE's linear-probe protocol (main_linprobe.py) on cached features: BatchNorm without affine +
    Linear (std 0.01), LARS (momentum 0.9, no weight decay), lr = blr·batch/256 with blr 0.1, linear
    warm-up then half-cycle cosine to 0, per step (as MAE's per-iteration schedule).

    MAE feeds the cls token after the final norm (``pool='cls'``) and augments every epoch
    (RandomResizedCrop + flip) through the frozen encoder at batch 16384; the features here are
    computed once (centre crops), so the numbers are a little lower than with augmentation.
    """
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"the probe's warm-up ({warmup_epochs} epochs) must be within its {epochs} epochs")
    lr = blr * batch_size / 256

    return _fit(train_x, train_y, val_x, val_y, epochs, batch_size, seed,
                lambda params: LARS(params, lr=lr, weight_decay=0.0),
                lambda step, t: lr_at(t, epochs, warmup_epochs, lr),  # by MAE's fractional epoch t
                f"blr (now {blr:g})")


def probe_checkpoint(encoder: nn.Module, probe: LinearProbe, pool: str, classes: list[str], top1: float,
                     img_size, pretrained: str, decode: str = "full") -> dict:
    """What ``lomar linprobe --save`` writes: the probe on the frozen ``encoder`` it was trained on (a
    VisionTransformer or a BEiT's timm Beit, without a head), as one
    :class:`~lomar.models.probe_classifier.ProbeClassifier` that ``lomar.load_model`` rebuilds (``model`` and
    ``model_spec``), pooled by ``pool``, with the names of its rows (``classes``, the class folders in label order),
    its ``top1``, the crop size it was scored at, the encoder's source (``pretrained``), how its images were decoded
    (``decode``, full or draft) and the precision its features were read in (float32): ``lomar predict`` reads and runs
    it so; and ``probe`` and ``pool`` alone, as a probe file without its encoder holds them."""
    model = ProbeClassifier(encoder, probe.linear.out_features, pool)
    model.probe = probe
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    return {"format": LINPROBE_FORMAT, "model": state, "model_spec": model_spec(model),
            "classes": list(classes[:model.num_classes]), "top1": top1, "img_size": img_size, "pretrained": pretrained,
            "decode": decode, "precision": "fp32",
            "probe": {k: v.detach().cpu() for k, v in probe.state_dict().items()}, "pool": pool}
