"""``benchmarks/decode_share.py``: the emulated-device run goes through the real input pipeline and
its auto share leaves the probe for the balance of what it measured (the real run takes minutes)."""

import numpy as np
import pytest
from PIL import Image

from helpers import load_benchmark
from lomar.data.decode_share import PROBE_SHARE, WORKER_HEADROOM, balanced_share


def test_auto_run_measures_both_sides_and_balances(tmp_path):
    y, x = np.mgrid[0:1200, 0:1600]
    for i in range(6):  # every 224 px crop of these decodes at 1/2 scale or less
        pixels = np.stack([(x * (i + 1)) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"photo{i}.jpg", quality=90)
    rec = load_benchmark("decode_share").run(str(tmp_path), None, workers=1, batches=12, batch_size=2,
                                             device_s=0.01, step_s=0.0)
    assert rec["share"] == "auto" and rec["images_per_s"] > 0 and len(rec["share_by_batch"]) == 12
    assert rec["share_by_batch"][0] == PROBE_SHARE and set(rec["means_ms"]) == {"t_pass", "t_draft", "t_device"}
    means = {name: ms / 1000 for name, ms in rec["means_ms"].items()}
    assert rec["share_last"] == pytest.approx(balanced_share(WORKER_HEADROOM, **means), abs=1e-3)
    assert 0 < rec["workers_decoded"] < 1
