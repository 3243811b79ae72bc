"""Golden BEiT pretraining cases from the original code: every folder with a ``beit_meta.json``.

Set LOMAR_REFERENCE_DIR to run against another directory of case folders (see its README). No
case found is a failure, not a skip: a mistyped directory must not pass silently.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import reference_cases, require_reference
from lomar.checkpoints.keys_beit import load_original_beit
from lomar.models.beit import BEiTConfig
from lomar.models.blockmask import BlockMaskGenerator, block_mask_batch

ATOL, RTOL = 1e-5, 1e-4
META = "beit_meta.json"


def _load(case: Path):
    require_reference(case)
    meta = json.loads((case / META).read_text())
    config_keys = set(BEiTConfig.__dataclass_fields__)
    model = load_original_beit(case / "beit_checkpoint.pth", **{k: meta[k] for k in config_keys if k in meta})
    data = {k: torch.from_numpy(v) for k, v in np.load(case / "beit_case.npz").items()}
    return meta, model.eval(), data


@pytest.mark.parametrize("case", reference_cases(META))
def test_beit_case(case):
    meta, model, data = _load(case)
    # Every configured value reached the model; eps is checked directly (1e-5 would hide in rtol).
    for key in BEiTConfig.__dataclass_fields__:
        if key in meta and key != "init_values":  # γ come from the checkpoint, their start value is moot
            assert getattr(model.config, key) == meta[key], key
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {meta["norm_eps"]}

    images, mask, ids = data["images"], data["bool_masked_pos"], data["input_ids"]
    n, length = mask.shape
    assert mask.dtype == torch.bool and length == meta["num_patches"] == model.config.num_patches
    assert int(mask.sum()) == meta["num_masked_total"]
    assert mask.sum(1).tolist() == meta["masking"]["masked_per_image"]
    assert torch.equal(model.masked_labels(ids, mask), data["labels"])  # gather order, exactly

    with torch.no_grad():
        loss, logits = model(images, mask, ids)
        _, logits_all = model(images, mask, ids, return_all_tokens=True)
        features = model.forward_features(images, mask)
        biases = model.rel_pos_bias_for_grid()
    torch.testing.assert_close(logits, data["logits"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits_all, data["logits_all"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loss, data["loss"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loss.item(), meta["loss_value"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(features, data["features"], atol=ATOL, rtol=RTOL)
    if "rel_pos_bias" in data:
        # (1, ...) for the shared table, (depth, ...) per block; with both kinds on, the per-block
        # array may hold each block's own table or the sum, so either is accepted.
        expected = data["rel_pos_bias"]
        with torch.no_grad():
            candidates = [torch.stack(biases)]
            if model.rel_pos_bias is not None:
                candidates.append(model.rel_pos_bias()[None])
            if model.config.use_rel_pos_bias:
                candidates.append(torch.stack([block.attn.own_bias() for block in model.blocks]))
        errors = [(c - expected).abs().max().item() for c in candidates if c.shape == expected.shape]
        assert errors and min(errors) <= ATOL + RTOL * expected.abs().max().item(), errors


@pytest.mark.parametrize("case", reference_cases(META))
def test_beit_case_masks_come_from_our_block_generator(case):
    """The case's masks were drawn by the original generator: ours, seeded the same, redraws them."""
    meta, _, data = _load(case)
    args = dict(meta["masking"])
    if "python_random_seed" not in args:
        pytest.skip("case does not record the mask seed")
    generator = BlockMaskGenerator(args["input_size"], args["num_masking_patches"], args["min_num_patches"],
                                   args.get("max_num_patches"), args.get("min_aspect", 0.3), args.get("max_aspect"),
                                   seed=args["python_random_seed"])
    mask = data["bool_masked_pos"]
    assert torch.equal(block_mask_batch(generator, n=mask.shape[0]), mask)
