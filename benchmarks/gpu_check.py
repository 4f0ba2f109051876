"""One prepared GPU check of MoSE (under 8 minutes on one GPU), JSON to stdout:

  - moe_block: the MoE block forward+backward in bf16, ours against transformers' Qwen3-MoE block (grouped_mm and the
    other experts implementations) and a dense FFN of the same activated width -- benchmarks/moe_layer.py's
    `bench_shape` (same weights, interleaved rounds, medians, ratios from one run).
  - train: a training step (forward, backward, AdamW) of a ~1B-activated MoSE model (LLaVA: a small SigLIP tower + a
    Qwen2 text decoder whose every FFN is an 8-expert top-2 block; random init, bf16 weights and optimizer state,
    text-only batches), tokens/s and MFU. Model FLOPs per token are counted from the config as in PaLM (Chowdhery et
    al. 2022, appendix B): 6 * N_activated + 12 * layers * heads * head_dim * seq, N_activated = the text decoder's
    parameters a token passes through (attention, router, top_k experts, norms) + the LM head (the embedding lookup
    is no matmul). MFU = model FLOPs / step time / the GPU's peak dense bf16 FLOP/s (PEAK_BF16_TFLOPS by device
    name; unknown device or CPU -> null).
  - generate: greedy `generate` with the KV cache, an image in every prompt, new tokens per second.
  - peak_mem_mib: torch.cuda.max_memory_allocated of each part (null on CPU).

    python benchmarks/gpu_check.py            # on a GPU: the full check (bf16)
    python benchmarks/gpu_check.py --tiny     # tiny shapes, fp32, seconds (automatic when CUDA is unavailable)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# peak dense (no sparsity) bf16 tensor FLOP/s, in TFLOP/s, from the vendor data sheets (NVIDIA H100 / H200 SXM:
# 989.4 (1979 with 2:4 sparsity); A100: 312)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}

# the ~1B-activated model: 20 layers x (12.6M attention + 34.6M two-expert FFN + router) + 65.5M LM head ~ 1.01B
FULL = dict(hidden=2048, layers=20, heads=16, kv_heads=8, experts=8, top_k=2, expert_ffn=2816, vocab=32000,
            batch=4, seq=2048, steps=6, gen_batch=8, gen_prompt=128, gen_new=128,
            moe_shapes=[(1024, 1024, 8, 2, 4096), (512, 512, 16, 2, 2048), (1024, 256, 64, 8, 4096),
                        (2048, 2816, 8, 2, 8192)], moe_repeats=7)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, experts=4, top_k=2, expert_ffn=48, vocab=512,
            batch=2, seq=32, steps=3, gen_batch=2, gen_prompt=12, gen_new=4,
            moe_shapes=[(64, 32, 4, 2, 64)], moe_repeats=2)
IMAGE_TOKENS = 4  # a 16x16 image in 8x8 patches


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_config(size: dict):
    from transformers import LlavaConfig

    from mose import MoSEConfig

    text = dict(model_type="qwen2", hidden_size=size["hidden"], intermediate_size=size["expert_ffn"] * size["top_k"],
                num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                vocab_size=size["vocab"], max_position_embeddings=max(4096, size["seq"]), tie_word_embeddings=False)
    base = LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8, vision_use_head=False),
        text_config=text, image_token_index=size["vocab"] - 1, image_seq_length=IMAGE_TOKENS, vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return MoSEConfig(base_config=base, num_experts=size["experts"], num_experts_per_tok=size["top_k"], moe_layers="all",
                      expert_intermediate_size=size["expert_ffn"])


def activated_params(config) -> int:
    """Parameters one token passes through, from the config (Qwen2 decoder: q/k/v with bias, o without; RMSNorm
    weights; every layer a top_k-of-E SwiGLU MoE block with a bias-free router; untied LM head)."""
    t = config.get_text_config(decoder=True)
    h, head_dim = t.hidden_size, t.hidden_size // t.num_attention_heads
    q, kv = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    attention = (h * q + q) + 2 * (h * kv + kv) + q * h
    ffn = config.num_experts_per_tok * 3 * h * config.expert_ffn_size + config.num_experts * h
    per_layer = attention + ffn + 2 * h
    return t.num_hidden_layers * per_layer + h + t.vocab_size * h  # + final norm + LM head


def activated_params_counted(model) -> int:
    """The same from the instantiated modules: text decoder + LM head - embeddings - the unchosen experts' share."""
    decoder = model.get_decoder()
    total = sum(p.numel() for p in decoder.parameters()) - decoder.embed_tokens.weight.numel()
    total += model.get_output_embeddings().weight.numel()
    k, e = model.config.num_experts_per_tok, model.config.num_experts
    for block in model.moe_blocks():
        experts = sum(p.numel() for p in block.experts.parameters())
        total -= experts * (e - k) // e
    return total


def model_flops_per_step(config, batch: int, seq: int) -> int:
    """PaLM appendix B: 6 N + 12 L H Q T FLOPs per token (forward + backward), T = sequence length."""
    t = config.get_text_config(decoder=True)
    head_dim = t.hidden_size // t.num_attention_heads
    per_token = 6 * activated_params(config) + 12 * t.num_hidden_layers * t.num_attention_heads * head_dim * seq
    return per_token * batch * seq


def peak_for_name(name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a device named e.g. "NVIDIA H100 80GB HBM3"; None when not in the table."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name.upper()), None)


def peak_tflops(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, peak_for_name(name)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None


def check_moe_block(size: dict, device: str, dtype) -> list[dict]:
    from benchmarks.moe_layer import bench_shape

    args = argparse.Namespace(device=device, warmup=1, repeats=size["moe_repeats"], memory=False, threads=torch.get_num_threads())
    keep = ("shape", "tokens_per_s", "median_step_s", "skipped", "best_transformers", "ratio_vs_best_transformers",
            "ratio_vs_dense", "ratios_vs_each", "paired_ratios_vs_each", "max_abs_diff_vs_transformers", "targets_met")
    out = []
    for shape in size["moe_shapes"]:
        result = bench_shape(shape, args, dtype)
        out.append({k: result[k] for k in keep})
    return out


def check_train(model, size: dict, device: str) -> dict:
    config = model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, size["vocab"] - 2, (size["batch"], size["seq"]), generator=gen).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    model.train()
    times, losses = [], []
    for i in range(size["steps"] + 1):  # the first step (allocations, kernel selection) is a warm-up
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
        log(f"  train step {i}: {times[-1] if i else time.perf_counter() - t0:.3f}s loss {losses[-1]:.3f}")
    del opt
    step_s = statistics.median(times)
    tokens = size["batch"] * size["seq"]
    flops = model_flops_per_step(config, size["batch"], size["seq"])
    name, peak = peak_tflops(device)
    achieved = flops / step_s / 1e12
    return {
        "activated_params": activated_params(config),
        "activated_params_counted_from_modules": activated_params_counted(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "batch": size["batch"], "seq": size["seq"], "tokens_per_step": tokens, "timed_steps": len(times),
        "median_step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_flops_per_step": flops,
        "achieved_tflops": float(f"{achieved:.4g}"),
        "peak_bf16_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
        "losses": [round(v, 4) for v in losses],
    }


def check_generate(model, size: dict, device: str, dtype) -> dict:
    gen = torch.Generator().manual_seed(2)
    b, p, n = size["gen_batch"], size["gen_prompt"], size["gen_new"]
    ids = torch.randint(3, size["vocab"] - 2, (b, p), generator=gen)
    ids[:, 1:1 + IMAGE_TOKENS] = model.config.base_config.image_token_index
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "pixel_values": torch.randn(b, 3, 16, 16, generator=gen).to(device=device, dtype=dtype)}
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, use_cache=True)
    model.eval()
    model.generate(**batch, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(**batch, **kwargs)
    sync(device)
    seconds = time.perf_counter() - t0
    new = (out.shape[1] - p) * b
    return {"batch": b, "prompt_tokens": p, "new_tokens_per_row": out.shape[1] - p, "seconds": round(seconds, 4),
            "tokens_per_s": round(new / seconds, 1), "kv_cache": True, "image_per_prompt": True}


def run(tiny: bool | None = None, device: str | None = None) -> dict:
    import transformers

    from mose import MoSEForConditionalGeneration

    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = device != "cuda" if tiny is None else tiny
    size = TINY if tiny else FULL
    dtype = torch.bfloat16 if device == "cuda" and not tiny else torch.float32
    torch.manual_seed(0)
    name, peak = peak_tflops(device)
    report = {"benchmark": "gpu_check", "device": device, "device_name": name, "tiny": tiny, "dtype": str(dtype).split(".")[-1],
              "torch": torch.__version__, "transformers": transformers.__version__, "peak_mem_mib": {}}
    log(f"moe block ({len(size['moe_shapes'])} shapes)")
    reset_peak(device)
    report["moe_block"] = check_moe_block(size, device, dtype)
    report["peak_mem_mib"]["moe_block"] = peak_mib(device)
    config = build_config(size)
    report["model"] = {k: size[k] for k in ("hidden", "layers", "heads", "kv_heads", "experts", "top_k", "expert_ffn", "vocab")}
    log("build model")
    reset_peak(device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MoSEForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    log("train")
    report["train"] = check_train(model, size, device)
    report["peak_mem_mib"]["train"] = peak_mib(device)
    log("generate")
    reset_peak(device)
    report["generate"] = check_generate(model, size, device, dtype)
    report["peak_mem_mib"]["generate"] = peak_mib(device)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, fp32, seconds (default when CUDA is unavailable)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args(argv)
    report = run(tiny=True if args.tiny else None, device=args.device)
    print(json.dumps(report, indent=2, allow_nan=False, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
