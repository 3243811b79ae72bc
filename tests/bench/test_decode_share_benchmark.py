"""``benchmarks/decode_share.py``: the emulated-device run goes through the real input pipeline and
its auto share leaves the probe for the balance of what it measured (the real run takes minutes)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lomar.data.decode_share import PROBE_SHARE, WORKER_HEADROOM, balanced_share

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_share.py"


def _module():
    spec = importlib.util.spec_from_file_location("decode_share_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_run_measures_both_sides_and_balances(tmp_path):
    y, x = np.mgrid[0:1200, 0:1600]
    for i in range(6):  # every 224 px crop of these decodes at 1/2 scale or less
        pixels = np.stack([(x * (i + 1)) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"photo{i}.jpg", quality=90)
    rec = _module().run(str(tmp_path), None, workers=1, batches=12, batch_size=2, device_s=0.01, step_s=0.0)
    assert rec["share"] == "auto" and rec["images_per_s"] > 0 and len(rec["share_by_batch"]) == 12
    assert rec["share_by_batch"][0] == PROBE_SHARE and set(rec["means_ms"]) == {"t_pass", "t_draft", "t_device"}
    means = {name: ms / 1000 for name, ms in rec["means_ms"].items()}
    assert rec["share_last"] == pytest.approx(balanced_share(WORKER_HEADROOM, **means), abs=1e-3)
    assert 0 < rec["workers_decoded"] < 1
