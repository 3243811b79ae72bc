"""``--decode gpu`` with the workers' help: the share of the photos that the loader workers decode
themselves (reduced-size JPEG decoding, as ``--decode draft``) while the device decodes the rest.

At camera resolution one device's JPEG decoder can be slower than its training step: on an H200,
nvjpeg decodes 732 twelve-megapixel JPEGs/s while LoMaR trains on 1,038 images/s at 448 px
(``benchmarks/README.md``). Meanwhile the workers only read files and draw each sample's crop and
plan, 1.3 ms per 12-megapixel photo on a 2-core CPU: they have time to spare. Both decoders
together can do more than either alone.

``--cpu-decode-share auto`` balances them from what each is measured to cost, as running means over
the batches: a worker's wall seconds per photo it passes on encoded (``t_pass``: read, header, draws)
and per photo it decodes (``t_draft``), and the device's seconds per photo (``t_device``: from a
batch's arrival in the main process to its pixels being ready on the device, measured with the
device's other work running). With ``W`` workers and share ``s``, the workers supply
``W / ((1 - s) t_pass + s t_draft)`` photos/s and the device decodes ``1 / ((1 - s) t_device)``;
the two rates are equal at

    s = (W t_device - t_pass) / (W t_device - t_pass + t_draft),

with ``W`` discounted by :data:`WORKER_HEADROOM` for the workers' collate and hand-over, which the
per-photo times leave out. The share lives in shared memory: the main process writes it after every
batch, the workers read it for every photo. Which photos a worker decodes follows an error-diffusion
count (every photo adds the share to a credit; a photo is decoded when the credit reaches 1), so each
batch gets close to its share and no sample's random draws change: only the decoder of its pixels.
"""

from __future__ import annotations

import multiprocessing

__all__ = ["PROBE_SHARE", "WORKER_HEADROOM", "DecodeShare", "balanced_share"]

PROBE_SHARE = 0.1  # auto's share until both decoders have been timed
WORKER_HEADROOM = 0.9  # the share of a worker's time its per-photo measurements account for
_SMOOTHING = 0.2  # weight of a batch in the running means


def balanced_share(workers: float, t_pass: float, t_draft: float, t_device: float) -> float:
    """The share ``s`` in [0, 1] at which ``workers`` workers (seconds per photo: ``t_pass`` passed on,
    ``t_draft`` decoded) and the device (``t_device`` per photo) supply photos equally fast."""
    spare = workers * t_device - t_pass  # a worker-second per photo the device spends, less what passing costs
    if spare <= 0:
        return 0.0
    return min(1.0, spare / (spare + t_draft))


class DecodeShare:
    """The share of photos the workers decode; fixed (``share``: a number in [0, 1]) or balanced
    (``share=None``: ``auto``, starting at :data:`PROBE_SHARE` with ``workers`` > 0, else 0).

    The dataset calls :meth:`takes` in the workers; the main process calls :meth:`observe` after
    decoding each batch, which re-balances an ``auto`` share.
    """

    def __init__(self, share: float | None, workers: int = 0):
        if share is not None and not 0 <= share <= 1:
            raise ValueError(f"the CPU decode share must be in [0, 1] or auto, got {share}")
        self.auto, self.workers = share is None, workers
        start = share if share is not None else (PROBE_SHARE if workers > 0 else 0.0)
        self._shared = multiprocessing.RawValue("d", start)  # shared memory, forked or spawned workers alike
        self._credit = 0.0  # per process: each worker counts its own photos
        self.means: dict[str, float] = {}  # running t_pass, t_draft, t_device (seconds per photo)
        self.drafted = self.on_device = 0  # photos decoded by the workers and by the device so far

    @property
    def value(self) -> float:
        return self._shared.value

    def takes(self) -> bool:
        """Whether the worker decodes this photo (one that draft decoding can shrink)."""
        self._credit += self._shared.value
        if self._credit < 1 - 1e-9:  # 0.3 added ten times is 2.9999999999999996
            return False
        self._credit -= 1
        return True

    @property
    def decoded_share(self) -> float | None:
        """The share of the photos so far that the workers decoded (None before any)."""
        total = self.drafted + self.on_device
        return self.drafted / total if total else None

    def observe(self, worker_seconds: list[float | None], drafted: list[bool | None], device_seconds: float | None,
                on_device: int) -> None:
        """One batch: each photo's worker seconds and whether the worker decoded it (None for photos
        that only the reference path reads), and the device's seconds for its ``on_device`` photos
        (None: not timed)."""
        passed = [t for t, d in zip(worker_seconds, drafted) if t is not None and d is False]
        decoded = [t for t, d in zip(worker_seconds, drafted) if t is not None and d is True]
        self.drafted += len(decoded)
        self.on_device += on_device
        if not self.auto or device_seconds is None:
            return
        for name, values in (("t_pass", passed), ("t_draft", decoded)):
            if values:
                self._update(name, sum(values) / len(values))
        if on_device:
            self._update("t_device", device_seconds / on_device)
        if self.workers > 0 and len(self.means) == 3:
            self._shared.value = balanced_share(WORKER_HEADROOM * self.workers, **self.means)

    def _update(self, name: str, value: float) -> None:
        old = self.means.get(name)
        self.means[name] = value if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * value

