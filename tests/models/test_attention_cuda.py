"""FlexAttention iRPE on CUDA equals the dense path, forward and gradients (skipped without CUDA)."""

import pytest
import torch

from lomar import VisionTransformer, ViTConfig
from lomar.models import attention as A

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention with gradients needs CUDA")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("grid", [(7, 7), (14, 20)])
@pytest.mark.parametrize("masked", [False, True])
def test_flex_equals_dense_on_cuda(grid, masked):
    gen = torch.Generator(device="cuda").manual_seed(0)
    length = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(2, 4, length, 64, device="cuda", generator=gen).requires_grad_() for _ in range(3))
    table = (0.5 * torch.randn(64, 50, device="cuda", generator=gen)).requires_grad_()
    key_bias = None
    if masked:
        key_bias = torch.zeros(2, 1, 1, length, device="cuda")
        key_bias[1, ..., -5:] = float("-inf")
    assert A.select_mode("auto", 1, 12, 4097, q.device) == "flex"
    outs = [A.rpe_attention(q, k, v, table, grid, mode, key_bias) for mode in ("dense", "flex", "chunked")]
    weights = torch.randn(outs[0].shape, device="cuda", generator=gen)
    grads = [torch.autograd.grad((o * weights).sum(), (q, k, v, table)) for o in outs]
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], **TOL)
        for g, g_dense in zip(grad, grads[0]):
            torch.testing.assert_close(g, g_dense, **TOL)


def test_encoder_flex_equals_dense_on_cuda():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2)).cuda()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.rpe.table.normal_(std=0.3)
    images = torch.randn(1, 3, 224, 288, device="cuda")
    results = []
    for mode in ("dense", "flex"):
        model.zero_grad()
        x, grid = model.embed(images)
        out = model.forward_blocks(x, grid, attention=mode)
        out.square().mean().backward()
        results.append((out.detach(), model.blocks[0].attn.rpe.table.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    torch.testing.assert_close(results[1][1], results[0][1], **TOL)
