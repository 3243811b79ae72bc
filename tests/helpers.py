"""Helpers shared by the tests (import them: ``from helpers import ...``); fixtures live in conftest.py."""

from __future__ import annotations

import collections
import contextlib
import errno
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lomar.checkpoints.io import atomic_save
from lomar.cli.app import main
from lomar.train import runtime

_DEFAULT_REFERENCE = Path(__file__).resolve().parent / "reference"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The module of the script ``benchmarks/<name>.py``, loaded from its file (benchmarks are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # what dataclasses look a module's names up in
    spec.loader.exec_module(module)
    return module


def reference_dir() -> Path:
    """The golden-vector folder: ``LOMAR_REFERENCE_DIR``, else ``tests/reference`` in this repository."""
    return Path(os.environ.get("LOMAR_REFERENCE_DIR", _DEFAULT_REFERENCE))


def reference_cases(meta_name: str) -> list:
    """One pytest param per case folder holding ``meta_name``; without any, one param that fails
    in :func:`require_reference` (or is skipped under ``LOMAR_SKIP_REFERENCE=1``)."""
    root = reference_dir()
    found = sorted(p.parent for p in root.glob(f"*/{meta_name}")) if root.is_dir() else []
    if found:
        return [pytest.param(p, id=p.name) for p in found]
    return missing_reference(f"no {meta_name} case under {root}" if root.is_dir() else f"no reference dir {root}")


def missing_reference(reason: str) -> list:
    if os.environ.get("LOMAR_SKIP_REFERENCE") == "1":  # explicit opt-out, e.g. for packagers without the data
        return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=f"{reason} (LOMAR_SKIP_REFERENCE=1)"))]
    return [pytest.param(reason, id="missing")]


def require_reference(case) -> None:
    """A missing reference must fail, not pass as 'skipped': a clone without the data is not tested."""
    if isinstance(case, str):
        pytest.fail(f"{case}; restore tests/reference from git, set LOMAR_REFERENCE_DIR to a folder of "
                    f"case folders, or set LOMAR_SKIP_REFERENCE=1 to skip the golden-vector tests explicitly")


# A 2-block, 32-wide ViT on 32 px crops: 4x4 patch grid, 3x3 windows, 2 per image.
TINY = ["--model", "vit_tiny_patch8", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--img-size", "32", "--window-size", "3", "--windows", "2", "--batch-size", "4", "--epochs", "2",
        "--workers", "0", "--threads", "1", "--log-every", "1", "--device", "cpu", "--lr", "1e-3",
        "--warmup-epochs", "0.5", "--precision", "fp32"]


# A command run in the test's process on the CPU: one thread, no loader workers.
CPU_RUN = ["--workers", "0", "--threads", "1", "--device", "cpu"]


def photo_like(height: int, width: int) -> np.ndarray:
    """Smooth shading with a few sharp edges, as photos have (not noise: a DCT-scaled decode is a low-pass)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([128 + 100 * np.sin(7 * x + 3 * y), 128 + 100 * np.cos(5 * y), 255 * x * y], axis=-1)
    rgb[height // 3:height // 2, width // 4:width // 2] = (250, 20, 40)
    return rgb.clip(0, 255).astype(np.uint8)


def write_images(folder: Path, count: int, size: tuple[int, int] = (40, 48)) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = (np.random.RandomState(i).rand(*size, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return folder


def first_image_split(ann: Path, out: Path) -> Path:
    """COCO annotation file ``ann`` cut to its first image and that image's annotations, written to ``out``: a
    validation split for runs whose evaluations are not what a test checks (a randomly initialised detector's mask
    head runs on 100 boxes an image)."""
    data = json.loads(ann.read_text())
    first = data["images"][0]["id"]
    out.write_text(json.dumps({**data, "images": data["images"][:1],
                               "annotations": [a for a in data["annotations"] if a["image_id"] == first]}))
    return out


def redrawn(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with every weight drawn anew from N(0, 0.2), seed 0 (a head initialised near zero would
    give every input the same output)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


def detector_file(path: Path, model: torch.nn.Module, settings: dict | None = None) -> dict:
    """``model`` (a ViTMaskRCNN of 3 categories) written to ``path`` as `lomar detect` saves it at step 2: its weights
    and its task's own state, with DetectConfig(img_size=64, **settings); the checkpoint."""
    from lomar.train.detect import DetectTask  # the writer itself
    from lomar.train.detect_config import DetectConfig

    task = SimpleNamespace(model=model, config=DetectConfig(img_size=64, **(settings or {})), categories=[1, 2, 5],
                           val=SimpleNamespace(names=["a", "b", "c"]))
    checkpoint = {"model": model.state_dict(), **DetectTask.state(task), "step": 2}
    atomic_save(checkpoint, path)
    return checkpoint


def segmenter_file(path: Path, model: torch.nn.Module) -> dict:
    """``model`` (an UperNetSegmenter) written to ``path`` as `lomar segment` saves it at step 2, with the settings it
    was built with; the checkpoint."""
    from lomar.train.segment import SegmentTask  # the writer itself
    from lomar.train.segment_config import SegmentConfig

    config = SegmentConfig(num_classes=model.num_classes, head_channels=model.decode_head.classifier.in_channels,
                           aux_weight=model.aux_weight)
    task = SimpleNamespace(model=model, config=config)
    checkpoint = {"model": model.state_dict(), **SegmentTask.state(task), "step": 2}
    atomic_save(checkpoint, path)
    return checkpoint


def counted_mask_pastes(monkeypatch) -> list[int]:
    """From here on, how many masks each call of torchvision's ``paste_masks_in_image`` pastes (its ``roi_heads``' and
    its detection ``transform``'s, the name each calls), in call order; torchvision still pastes them."""
    from torchvision.models.detection import roi_heads, transform  # torchvision's detection: for these tests alone

    pasted, paste = [], roi_heads.paste_masks_in_image
    for module in (roi_heads, transform):
        monkeypatch.setattr(module, "paste_masks_in_image",
                            lambda masks, *args: pasted.append(len(masks)) or paste(masks, *args))
    return pasted


def pretrain(*args: str) -> int:
    return main(["pretrain", *TINY, *args])


def one_step_run(root: Path, images: Path) -> Path:
    """``last.pt`` of a 1-step tiny LoMaR run (TINY) on ``images``, its run folder made under ``root``."""
    out = root / "run"
    assert pretrain("--data", str(images), "--out", str(out), "--max-steps", "1") == 0
    return out / "last.pt"


def assert_same_weights_but_key_bias(got: dict, want: dict) -> None:
    """Each tensor of the state dict ``got`` (a distributed run's) equals ``want``'s (one process's), to float32
    rounding, but for the attention's key bias: it has an exactly zero gradient (softmax ignores a constant added to
    every logit of a row), whose rounding noise Adam turns into lr-sized steps that differ with the reduction order.
    Query and value biases must match."""
    for key, value in want.items():
        other = got[key]
        if key.endswith("attn.qkv.bias"):
            dim = value.shape[0] // 3
            value, other = torch.cat([value[:dim], value[2 * dim:]]), torch.cat([other[:dim], other[2 * dim:]])
        torch.testing.assert_close(other, value, rtol=0, atol=2e-6, msg=key)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "step": step}


class FillingFile:
    """A binary file on a disk with ``room`` bytes left: a write past it writes what fits, then
    raises ENOSPC, as the kernel does (what the writer makes of it, e.g. torch.save's zip writer, is real)."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if data.nbytes > self._room:  # what fits is written, then the disk is full
            import errno

            self._handle.write(data[:self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= data.nbytes
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a gloo group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_torchrun(argv: list[str], world: int, folder: Path, timeout: float = 120) -> list[tuple[int, str, str]]:
    """``lomar ARGV`` in ``world`` processes of one gloo group, in torchrun's environment: each process's (exit code,
    stdout, stderr), its streams written to ``folder``/rank<r>.out and .err. Forked from this one, so that none
    imports torch and lomar afresh (a torchrun launch: 20-30 s); where torchrun's own behaviour is what a test
    checks, launch torchrun. Each process runs one CPU thread: one that runs more after a fork from a process that has
    used OpenMP's threads (pytest's) waits forever in its first parallel region (GNU OpenMP is not fork-safe)."""
    if "--threads" in argv and argv[argv.index("--threads") + 1] != "1":
        raise ValueError("as_torchrun's forked processes run one thread each: more would hang in OpenMP")
    port = free_port()
    children = {}
    for rank in range(world):
        outputs = [folder / f"rank{rank}.{name}" for name in ("out", "err")]
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            code = 99
            try:
                os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_PORT=str(port),
                                  LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
                for fd, path in zip((1, 2), outputs):  # C++'s lines too, none into pytest's streams
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.stdout, sys.stderr = (open(fd, "w", closefd=False) for fd in (1, 2))
                logging.getLogger().handlers.clear()  # pytest's: a warning goes to stderr, as in a command
                runtime.default_threads = lambda: 1  # without --threads: this machine's cores // 2 hang (above)
                code = main(argv)
            except BaseException:  # noqa: BLE001 - said in the child's stderr, which the test shows
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = outputs
    codes, deadline = {}, time.monotonic() + timeout
    try:
        while len(codes) < world and time.monotonic() < deadline:
            for pid in set(children) - set(codes):  # these alone: no other child of pytest's is this test's to reap
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
    finally:
        for pid in set(children) - set(codes):  # a process still waiting in a collective: a hang
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return [(codes.get(pid, "hung"), *(path.read_text() for path in outputs)) for pid, outputs in children.items()]


def applied_grad_norms(run) -> list[float]:
    """Call ``run()`` (a command: it must return 0); the gradient norm each optimizer step applied."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, *_: norms.append(float(torch.linalg.vector_norm(
        # float64: a float32 sum over a ViT-B's 86M squares is 0.5 % off
        torch.cat([p.grad.double().flatten() for g in optimizer.param_groups for p in g["params"]
                   if p.grad is not None])))))
    try:
        assert run() == 0
    finally:
        hook.remove()
    return norms


def fill_disk(monkeypatch, room: int = 4096) -> None:
    """From now on every file lomar writes (``lomar.checkpoints.io``) meets a full disk after
    ``room`` bytes: logs and settings still fit, a checkpoint does not."""
    import builtins

    def opener(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        return FillingFile(handle, room) if "w" in mode or "x" in mode else handle

    monkeypatch.setattr("lomar.checkpoints.io.open", opener, raising=False)


def dead_pid() -> int:
    """The PID of a process that has ended (a child run and waited for): what a killed writer's leftovers name."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def no_flock(monkeypatch, code: int = errno.ENOLCK) -> None:
    """Every ``fcntl.flock`` fails with ``code``, as on a filesystem without it (ENOLCK: an NFS mount without locks;
    ENOSYS: Lustre mounted -o noflock)."""
    def refused(handle, flags):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("fcntl.flock", refused)


_ATEN_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
               "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"}
_VALUE_READS = {torch.Tensor.tolist, torch.Tensor.numpy}  # on the CPU these read without an aten op


class _AtenReads(TorchDispatchMode):
    def __init__(self, reads: collections.Counter):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        boolean_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in _ATEN_READS or boolean_index:  # a boolean index is a nonzero below the dispatcher
            self.reads[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _ValueReads(TorchFunctionMode):
    def __init__(self, reads: collections.Counter):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _VALUE_READS:
            self.reads[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads():
    """A Counter of the reads of tensor values back to the host made inside (``int(t)``, ``bool(t)``,
    ``.item()``, ``.tolist()``, ``nonzero``, a boolean index...): on a GPU, each waits for the device."""
    reads = collections.Counter()
    with _ValueReads(reads), _AtenReads(reads):
        yield reads
