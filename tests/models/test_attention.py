"""Memory-efficient iRPE attention (chunked, flex) equals the dense path; ViTDet windowed blocks."""

import warnings
from dataclasses import replace

import pytest
import torch

from lomar import VisionTransformer, ViTConfig
from lomar.models import attention as A
from lomar.models import rpe
from lomar.models.attention_sizes import CHUNK_BIAS_BYTES
from lomar.models.backbones import ViTDetBackbone
from lomar.models.rpe import bucket_table

TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(b=2, h=3, grid=(5, 7), d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    length = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(b, h, length, d, generator=gen).requires_grad_() for _ in range(3))
    table = (torch.randn(d, 50, generator=gen) * 0.5).requires_grad_()
    return q, k, v, table


def _grads(out, *inputs):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * weights).sum(), inputs)


@pytest.mark.parametrize("grid", [(1, 1), (3, 3), (4, 9), (13, 6)])
def test_bucket_rows_from_offsets_equal_the_full_table(grid):
    full = bucket_table(grid)
    offsets = A.offset_buckets(grid)
    assert offsets.shape == (2 * grid[0] - 1, 2 * grid[1] - 1)
    length = full.shape[0]
    for start, stop in [(0, length), (0, 1), (1, min(length, 6)), (length - 1, length)]:
        assert torch.equal(A.bucket_rows(offsets, grid, start, stop), full[start:stop])


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_dense_forward_and_gradients(recompute, masked):
    grid = (5, 7)
    q, k, v, table = _qkv(grid=grid)
    key_bias = None
    if masked:  # padding-style key mask, as windowed blocks use
        key_bias = torch.zeros(2, 1, 1, q.shape[2])
        key_bias[0, ..., -4:] = float("-inf")
    dense = A.rpe_attention(q, k, v, table, grid, "dense", key_bias)
    chunked = A.rpe_attention(q, k, v, table, grid, "chunked", key_bias, chunk=8, recompute=recompute)
    torch.testing.assert_close(chunked, dense, **TOL)
    for g_chunked, g_dense in zip(_grads(chunked, q, k, v, table), _grads(dense, q, k, v, table)):
        assert g_dense.abs().sum() > 0
        torch.testing.assert_close(g_chunked, g_dense, **TOL)


@pytest.mark.parametrize("grid", [(7, 7), (14, 20)])
def test_the_bias_by_selection_matmul_equals_the_gather(grid, monkeypatch):
    """irpe_bias picks T[i, bucket(i, j)] by a 0/1 matmul up to SELECTION_LIMIT, by gather past it: the
    forward bit for bit (fp32 and bf16), the gradients as float64 sums in another order."""
    buckets = bucket_table(grid)
    assert buckets.numel() * rpe.NUM_BUCKETS <= rpe.SELECTION_LIMIT  # the windows and 14x20 use the matmul
    selection = rpe.bucket_selection(buckets, torch.float32)
    assert selection.shape == (buckets.shape[0], rpe.NUM_BUCKETS, buckets.shape[1])
    assert torch.equal(selection.sum(1), torch.ones_like(buckets, dtype=torch.float32))
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q = torch.randn(2, 3, buckets.shape[0], 8, generator=gen, dtype=dtype).requires_grad_()
        table = torch.randn(8, rpe.NUM_BUCKETS, generator=gen, dtype=dtype).requires_grad_()
        by_matmul = rpe.irpe_bias(q, table, buckets)
        with monkeypatch.context() as patch:
            patch.setattr(rpe, "SELECTION_LIMIT", buckets.numel() * rpe.NUM_BUCKETS - 1)
            by_gather = rpe.irpe_bias(q, table, buckets)
        assert torch.equal(by_matmul, by_gather), dtype
        if dtype == torch.float64:
            for g, g_ref in zip(_grads(by_matmul, q, table), _grads(by_gather, q, table)):
                assert g.abs().sum() > 0
                torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


def test_dense_mode_is_the_rpe_module_bias():
    grid = (4, 4)
    model = VisionTransformer(ViTConfig(img_size=64, patch_size=16, embed_dim=24, depth=1, num_heads=3))
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.rpe.table.normal_(std=0.5)
    x = torch.randn(2, 17, 24)
    torch.testing.assert_close(attn(x, grid=grid, mode="chunked"), attn(x, bucket_table(grid)), **TOL)


def test_flex_equals_dense_in_the_forward_on_cpu():
    grid = (3, 4)
    q, k, v, table = (t.detach() for t in _qkv(grid=grid))
    key_bias = torch.zeros(2, 1, 1, q.shape[2])
    key_bias[1, ..., 5] = float("-inf")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        flex = A._flex(q, k, v, table, grid, key_bias, compiled=False)
        dense = A.rpe_attention(q, k, v, table, grid, "dense", key_bias)
    torch.testing.assert_close(flex, dense, **TOL)


def test_the_flex_score_mod_reads_inside_its_buffers_on_block_padding():
    """The compiled kernel calls score_mod on its last block's padding too (up to 128 here) and does
    not bounds-check the loads: every index the score_mod makes must be valid, and on the sequence
    it must give the dense bias."""
    grid, length = (3, 4), 13
    scores, key_bias = torch.randn(2, 2, length, 50), torch.randn(2, 1, 1, length)
    mod = A.irpe_score_mod(scores, grid, key_bias)
    dense = scores.gather(-1, bucket_table(grid).expand(2, 2, length, length)) + key_bias
    zero, b, h = torch.tensor(0.0), torch.tensor(1), torch.tensor(0)
    for i in range(length):
        for j in range(length):
            torch.testing.assert_close(mod(zero, b, h, torch.tensor(i), torch.tensor(j)), dense[1, 0, i, j])
    for i, j in [(5, 127), (127, 5), (127, 127), (length, length), (0, 100)]:  # padding: valid reads, any value
        assert torch.isfinite(mod(zero, b, h, torch.tensor(i), torch.tensor(j)))


def test_auto_selection_falls_back_to_chunked_on_cpu():
    cpu = torch.device("cpu")
    assert A.select_mode("auto", 1, 12, 197, cpu) == "dense"
    assert A.select_mode("auto", 4096, 12, 50, cpu) == "dense"  # pretraining windows: any batch
    assert A.select_mode("auto", 1, 12, 1601, cpu) == "dense"  # 640 px, 118 MiB of bias
    assert A.select_mode("auto", 4, 12, 1601, cpu) == "chunked"
    assert A.select_mode("auto", 1, 12, 4097, cpu) == "chunked"  # 805 MB of bias per block
    assert not A.flex_available(cpu)
    assert A.select_mode("flex", 1, 12, 50, cpu) == "flex"
    with pytest.raises(ValueError, match="choose one of"):
        A.select_mode("sparse", 1, 1, 1, cpu)
    q, k, v, table = _qkv(grid=(2, 2))
    with pytest.raises(ValueError, match="needs CUDA for training"):
        A.rpe_attention(q, k, v, table, (2, 2), "flex")
    rows = A.chunk_rows(1, 12, 16385)
    assert 16 <= rows and rows * 12 * 16385 * 4 <= CHUNK_BIAS_BYTES


def _encoder(pos, seed=0, **overrides):
    torch.manual_seed(seed)
    config = ViTConfig(**{**dict(img_size=96, patch_size=16, embed_dim=32, depth=2, num_heads=2, pos=pos),
                          **overrides})
    model = VisionTransformer(config)
    if pos == "rpe":
        with torch.no_grad():
            for block in model.blocks:
                block.attn.rpe.table.normal_(std=0.3)
    return model


@pytest.mark.parametrize("pos", ["rpe", "abs"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_encoder_modes_agree_in_forward_and_gradients(pos, ckpt):
    model = _encoder(pos)
    model.set_grad_checkpointing(ckpt)
    images = torch.randn(2, 3, 80, 96)
    results = {}
    for mode in ("dense", "chunked"):
        model.zero_grad()
        x, grid = model.embed(images)
        out = model.norm(model.forward_blocks(x, grid, attention=mode))
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results[mode] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (d_out, d_grads), (c_out, c_grads) = results["dense"], results["chunked"]
    torch.testing.assert_close(c_out, d_out, **TOL)
    assert d_grads.keys() == c_grads.keys() and "blocks.0.attn.qkv.weight" in d_grads
    if pos == "rpe":
        assert d_grads["blocks.0.attn.rpe.table"].abs().sum() > 0
    for name in d_grads:
        torch.testing.assert_close(c_grads[name], d_grads[name], **TOL, msg=name)


def test_config_attention_is_used_and_checked():
    dense, chunked = _encoder("rpe"), _encoder("rpe", attention="chunked")
    chunked.load_state_dict(dense.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(chunked(images), dense(images), **TOL)
    with pytest.raises(ValueError, match="unknown attention 'fast'"):
        _encoder("rpe", attention="fast")
    with pytest.raises(ValueError, match="global blocks \\[2\\] are not blocks of this 2-block encoder"):
        _encoder("rpe", window_size=4, global_blocks=(2,))


@pytest.mark.parametrize("mode", ["dense", "chunked"])
def test_one_padded_window_over_the_grid_is_global_attention(mode):
    attn = _encoder("rpe").blocks[0].attn
    grid = (3, 5)
    x = torch.randn(2, 1 + 15, 32)
    windowed = A.windowed_attention(attn, x, grid, window=6, mode=mode)  # one 6x6 tile, 21 padded keys
    torch.testing.assert_close(windowed, attn(x, grid=grid, mode="dense"), **TOL)


def test_windows_attend_inside_their_tile_and_ignore_padding():
    attn = _encoder("rpe").blocks[0].attn
    grid, window = (5, 7), 3  # tiles 2x3, the last row and column partly padding
    x = torch.randn(1, 1 + 35, 32)
    out = A.windowed_attention(attn, x, grid, window)
    spatial = lambda t: t[:, 1:].reshape(1, *grid, -1)  # noqa: E731
    # A bottom-right tile holds a 2x1 block of real tokens: equal to attention over cls + those two.
    corner = spatial(x)[:, 3:5, 6:7].reshape(1, 2, -1)
    alone = attn(torch.cat([x[:, :1], corner], dim=1), grid=(2, 1), mode="dense")
    torch.testing.assert_close(spatial(out)[:, 3:5, 6:7].reshape(1, 2, -1), alone[:, 1:], **TOL)
    # Changing a token of another tile leaves the first tile's tokens as they were.
    y = x.clone()
    y[:, 1 + 4 * 7 + 4] += 1.0  # row 4, col 4: tile (1, 1)
    out_y = A.windowed_attention(attn, y, grid, window)
    torch.testing.assert_close(spatial(out_y)[:, :3, :3], spatial(out)[:, :3, :3])
    assert not torch.allclose(spatial(out_y)[:, 3:, 3:6], spatial(out)[:, 3:, 3:6])


def test_windowed_encoder_and_vitdet_backbone_train_end_to_end():
    encoder = _encoder("rpe", depth=4)
    backbone = ViTDetBackbone(encoder, out_channels=8, window_size=4, global_blocks=(1, 3),
                              grad_checkpointing=True).train()
    assert backbone.encoder.config.window_size == 4 and backbone.encoder.config.global_blocks == (1, 3)
    assert [backbone.encoder.block_window(i) for i in range(4)] == [4, 0, 4, 0]
    images = torch.randn(1, 3, 128, 96)  # 8x6 grid: 2x2 tiles, the right column padded
    out = backbone(images)
    sum(v.square().mean() for v in out.values()).backward()
    assert backbone.encoder.blocks[0].attn.rpe.table.grad.abs().sum() > 0
    # Windows change the result (they are not global attention) but the weights are the encoder's.
    with torch.no_grad():
        plain = ViTDetBackbone(encoder, out_channels=8).eval()
        plain.pyramid.load_state_dict(backbone.pyramid.state_dict())
        backbone.eval()
        assert not torch.allclose(plain(images)["p4"], backbone(images)["p4"])
        assert torch.equal(plain.encoder.patch_embed.proj.weight, backbone.encoder.patch_embed.proj.weight)
    windowed_config = replace(encoder.config, window_size=16)
    wide = VisionTransformer(windowed_config)
    wide.load_state_dict(encoder.state_dict())
    with torch.no_grad():  # one window larger than the grid in every block: global attention
        torch.testing.assert_close(wide.forward_features(images), encoder.forward_features(images), **TOL)


def test_relative_position_needs_the_whole_grid():
    model = _encoder("rpe")
    with pytest.raises(ValueError, match="every token of the grid"):
        model.forward_blocks(torch.randn(1, 5, 32), (3, 3))


@pytest.mark.parametrize("masked", [False, True])
def test_the_cuda_flex_check_passes_chunked_on_cpu(masked):
    """The comparison the CUDA test applies to flex (fp32 against dense, d(table) against float64)
    runs here on the chunked path, so it is known to work where no GPU is at hand."""
    from test_attention_cuda import check_against_dense

    check_against_dense("cpu", (7, 7), masked, ("chunked",))


def test_the_cuda_encoder_check_passes_chunked_on_cpu():
    from test_attention_cuda import check_encoder_against_dense

    check_encoder_against_dense("cpu", "chunked")
