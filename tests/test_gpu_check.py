"""benchmarks/gpu_check.py at its tiny CPU size: every key of the report, finite positive throughputs, and the FLOP
count of the MFU against a hand count of the tiny config."""
import math

import torch

from benchmarks import gpu_check


def test_tiny_cpu_run_reports_every_key_with_finite_positive_throughput():
    report = gpu_check.run(tiny=True, device="cpu")
    assert torch.get_default_dtype() == torch.float32  # the run builds its model in its dtype, then restores the default
    assert {"benchmark", "device", "device_name", "tiny", "dtype", "torch", "transformers", "moe_block", "model", "train",
            "generate", "peak_mem_mib", "wall_s"} <= set(report)
    assert report["tiny"] is True and report["device"] == "cpu" and report["dtype"] == "float32"
    assert set(report["peak_mem_mib"]) == {"moe_block", "train", "generate"}  # null on CPU (no CUDA allocator)
    for shape in report["moe_block"]:
        assert {"mose", "hf_grouped_mm", "dense"} <= set(shape["tokens_per_s"])
        assert all(math.isfinite(v) and v > 0 for v in shape["tokens_per_s"].values())
        assert {"ratio_vs_best_transformers", "ratio_vs_dense", "ratios_vs_each"} <= set(shape)
        # same weights and routing: our block's output equals transformers' (fp32 rounding)
        assert all(d < 1e-4 for d in shape["max_abs_diff_vs_transformers"].values())
    train, gen = report["train"], report["generate"]
    for key in ("activated_params", "total_params", "median_step_s", "tokens_per_s", "model_flops_per_step",
                "achieved_tflops", "peak_bf16_tflops", "mfu", "losses"):
        assert key in train
    assert math.isfinite(train["tokens_per_s"]) and train["tokens_per_s"] > 0
    assert train["achieved_tflops"] > 0 and train["peak_bf16_tflops"] is None and train["mfu"] is None  # CPU: no peak
    assert all(math.isfinite(v) for v in train["losses"])
    assert math.isfinite(gen["tokens_per_s"]) and gen["tokens_per_s"] > 0
    assert gen["new_tokens_per_row"] == gpu_check.TINY["gen_new"]  # min_new_tokens: every row generates its budget
    # the tiny config counted by hand (hidden 64, 4 heads of 16, 2 kv heads, 4 experts top-2 of width 48, vocab 512,
    # 2 layers): attention (64*64+64) + 2*(64*32+32) + 64*64 = 12416; experts 2*3*64*48 = 18432; router 4*64 = 256;
    # norms 2*64; per layer 31232; 2 layers + final norm 64 + LM head 512*64 = 95296
    assert train["activated_params"] == 95296
    assert train["activated_params_counted_from_modules"] == 95296
    # PaLM appendix B: per token 6*95296 + 12*2*4*16*32 = 620928; 2 x 32 tokens
    assert train["model_flops_per_step"] == 620928 * 64


def test_peak_table_by_device_name():
    assert gpu_check.peak_for_name("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_for_name("NVIDIA H200") == 989.4
    assert gpu_check.peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_for_name("NVIDIA GeForce GTX 1080") is None


def test_flops_formula_scales_with_sequence_only_in_the_attention_term():
    config = gpu_check.build_config(gpu_check.TINY)
    n = gpu_check.activated_params(config)
    per_token = {seq: gpu_check.model_flops_per_step(config, 1, seq) / seq for seq in (32, 64)}
    assert per_token[32] == 6 * n + 12 * 2 * 4 * 16 * 32
    assert per_token[64] - per_token[32] == 12 * 2 * 4 * 16 * 32
