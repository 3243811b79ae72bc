"""``lomar bench --profile``: where one step's time goes, by kernel kind. Nothing here is timed."""

import json

import pytest

from lomar.bench.profile import KINDS, kernel_kind
from lomar.cli.app import main


@pytest.mark.parametrize("name,kind", [
    # CUDA kernels as the profiler names them
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NNT", "gemm"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "gemm"),
    ("triton_tem_fused_mm_0", "gemm"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("triton_red_fused_native_layer_norm_3", "fused"),
    ("triton_poi_fused_add_gelu_7", "fused"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
    ("Memcpy HtoD (Pageable -> Device)", "other"),
    # CPU operators
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::mkldnn_convolution", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::_fused_adamw_", "optimizer"),
    ("Torch-Compiled Region: 0/0", "fused"), ("aten::copy_", "other"), ("aten::native_layer_norm", "other"),
])
def test_kernel_kinds(name, kind):
    assert kernel_kind(name) == kind


def test_bench_profile_writes_the_shares_of_every_configuration(tmp_path, capsys):
    out, profile = tmp_path / "bench.json", tmp_path / "profile.json"
    assert main(["bench", "--tiny", "--model", "vit_tiny_patch8", "--sizes", "64", "--methods", "lomar", "mae",
                 "--windows", "2", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--json", str(out), "--profile", str(profile), "--quiet"]) == 0
    records = json.loads(out.read_text())["records"]
    profiles = json.loads(profile.read_text())["profiles"]
    assert [(p["method"], p["img_size"]) for p in profiles] == [(r["method"], r["img_size"]) for r in records]
    for rec, prof in zip(records, profiles):
        assert tuple(prof["shares"]) == KINDS and rec["time_shares"] == prof["shares"]
        assert sum(prof["shares"].values()) == pytest.approx(1.0)
        assert prof["shares"]["gemm"] > 0 and prof["shares"]["optimizer"] > 0 and prof["clock"] == "cpu"
        assert prof["total_ms"] > 0 and 0 < len(prof["top"]) <= 20
        assert sum(t["share"] for t in prof["top"]) <= 1 + 1e-9
    printed = capsys.readouterr().out
    assert "lomar 64px: gemm " in printed and "mae 64px: gemm " in printed


def test_profile_is_for_the_pretrain_task(tmp_path, capsys):
    assert main(["bench", "--task", "backbone", "--profile", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "--profile profiles training steps, which --task backbone does not time" in err and err.count("\n") == 1
