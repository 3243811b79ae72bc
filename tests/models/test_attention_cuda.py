"""FlexAttention iRPE on CUDA equals the dense path, forward and gradients (skipped without CUDA)."""

import copy

import pytest
import torch

from lomar import VisionTransformer, ViTConfig
from lomar.models import attention as A

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention with gradients needs CUDA")
TOL = dict(atol=1e-5, rtol=1e-5)
# A gradient's error from float64, as a share of its largest entry, that any path may have. FlexAttention's
# softmax (exp2, online) and its atomic adds differ from dense's by rounding alone. Compared element by
# element with dense (1e-5), dq failed in one of three H200 runs at 1 element of 143,872 (1.5e-5 off, a
# value of 0.49); d(table) with a floor of 1e-5 of its scale failed once too. Wrong buckets err by far
# more: 4e-2 to 1.3 of the scale for a cls row read as spatial, two buckets merged, or query and key
# swapped (float64, both grids of these tests), so 5e-5 still fails every such bug.
GRAD_FLOOR = 5e-5


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _grads(q, k, v, table, grid, mode, key_bias, weights):
    out = A.rpe_attention(q, k, v, table, grid, mode, key_bias)
    return out, torch.autograd.grad((out * weights.to(out.dtype)).sum(), (q, k, v, table))


def check_against_dense(device: str, grid, masked: bool, modes) -> None:
    """Forward of ``modes`` against the dense path (fp32), gradients against float64 as dense is."""
    gen = torch.Generator(device=device).manual_seed(0)
    length = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(2, 4, length, 64, device=device, generator=gen).requires_grad_() for _ in range(3))
    table = (0.5 * torch.randn(64, 50, device=device, generator=gen)).requires_grad_()
    key_bias = None
    if masked:
        key_bias = torch.zeros(2, 1, 1, length, device=device)
        key_bias[1, ..., -5:] = float("-inf")
    weights = torch.randn(2, 4, length, 64, device=device, generator=gen)
    dense_out, dense_grads = _grads(q, k, v, table, grid, "dense", key_bias, weights)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    _, ref_grads = _grads(*exact, grid, "dense", None if key_bias is None else key_bias.double(), weights)
    for mode in modes:
        out, grads = _grads(q, k, v, table, grid, mode, key_bias, weights)
        torch.testing.assert_close(out, dense_out, **TOL)
        # Each gradient sums many products in a different order in each path (d(table): B·h·L² of them,
        # scatter-added): measure each path against float64, relative to the gradient's scale; the mode
        # must be as close as dense is.
        for name, g, g_dense, g_ref in zip(("q", "k", "v", "table"), grads, dense_grads, ref_grads):
            g_ref = g_ref.float()
            scale = g_ref.abs().max()
            err, err_dense = [float((x - g_ref).abs().max() / scale) for x in (g, g_dense)]
            assert err <= max(GRAD_FLOOR, 2 * err_dense), \
                f"{mode} d{name}: {err:.2e} of its scale from float64 (dense: {err_dense:.2e})"


@pytest.mark.parametrize("grid", [(7, 7), (14, 20)])
@pytest.mark.parametrize("masked", [False, True])
def test_flex_equals_dense_on_cuda(grid, masked):
    assert A.select_mode("auto", 1, 12, 4097, torch.device("cuda")) == "flex"
    check_against_dense("cuda", grid, masked, ("flex", "chunked"))


def check_encoder_against_dense(device: str, mode: str) -> None:
    """A 2-block RPE encoder through ``mode``: output against dense (fp32), the first block's
    d(table) against a float64 run of the dense path, relative to its scale (as above)."""
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2)).to(device)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.rpe.table.normal_(std=0.3)
    images = torch.randn(1, 3, 224, 288, device=device)

    def run(net, attention, x):
        net.zero_grad()
        tokens, grid = net.embed(x)
        out = net.forward_blocks(tokens, grid, attention=attention)
        out.square().mean().backward()
        return out.detach(), net.blocks[0].attn.rpe.table.grad.clone()

    dense_out, dense_grad = run(model, "dense", images)
    out, grad = run(model, mode, images)
    _, ref_grad = run(copy.deepcopy(model).double(), "dense", images.double())
    torch.testing.assert_close(out, dense_out, **TOL)
    ref_grad = ref_grad.float()
    scale = ref_grad.abs().max()
    err, err_dense = [float((g - ref_grad).abs().max() / scale) for g in (grad, dense_grad)]
    assert err <= max(GRAD_FLOOR, 2 * err_dense), \
        f"{mode} d(table): {err:.2e} of its scale from float64 (dense: {err_dense:.2e})"


def test_encoder_flex_equals_dense_on_cuda():
    check_encoder_against_dense("cuda", "flex")
