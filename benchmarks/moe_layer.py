"""Forward+backward throughput of the MoSE sparse block against transformers' Qwen3-MoE block and a dense FFN.

At each shape (hidden, expert ffn, experts, top-k, tokens), with identical weights and routing:
  - mose:              our MoSESparseBlock, default dispatch ("auto": on CPU the expert-parallel "sort" path)
  - mose_grouped_mm:   our block forced onto torch's grouped_mm kernel (the GPU path), for reference
  - hf_<impl>:         transformers Qwen3MoeSparseMoeBlock with experts implementation eager / grouped_mm / batched_mm
                       (batched_mm materialises one weight copy per token choice; skipped where it does not fit)
  - dense:             a dense SwiGLU FFN (Qwen3MoeMLP) with the same activated width top_k * expert_ffn: the
                       physical limit, since the sparse block does the same arithmetic plus routing.
Timings are interleaved round-robin and reported as medians so that ratios come from one run on the same (possibly
shared, noisy) machine. Peak memory of one step is measured in a fresh subprocess (CPU: peak RSS growth, reset
between contenders; GPU: torch.cuda.max_memory_allocated growth).

    python benchmarks/moe_layer.py            # the three shapes of issue 4, fp32, 2 threads, JSON to stdout
    python benchmarks/moe_layer.py --quick    # small shapes, a smoke run
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1024, 1024, 8, 2, 4096), (512, 512, 16, 2, 2048), (1024, 256, 64, 8, 4096)]
QUICK_SHAPES = [(256, 256, 8, 2, 512), (128, 128, 16, 2, 256), (256, 64, 64, 8, 512)]
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
TARGET_VS_TRANSFORMERS, TARGET_VS_DENSE = 1.0, 0.85


def build(name: str, shape, dtype, device, seed: int = 0):
    """One contender with deterministic weights: the same router and expert weights for mose and every hf_* block."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeSparseMoeBlock

    from mose.moe import MoSESparseBlock

    hidden, ffn, experts, top_k, _ = shape
    gen = torch.Generator().manual_seed(seed)
    router = torch.randn(experts, hidden, generator=gen) * 0.02
    gate_up = torch.randn(experts, 2 * ffn, hidden, generator=gen) * hidden**-0.5
    down = torch.randn(experts, hidden, ffn, generator=gen) * ffn**-0.5
    cfg = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=ffn, intermediate_size=ffn * top_k, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, hidden_act="silu",
    )
    if name.startswith("mose"):
        block = MoSESparseBlock(hidden, ffn, experts, top_k, dispatch="grouped_mm" if name == "mose_grouped_mm" else "auto")
        params = (block.router.weight, block.experts.gate_up_proj, block.experts.down_proj)
    elif name.startswith("hf_"):
        cfg._experts_implementation = name[3:]
        block = Qwen3MoeSparseMoeBlock(cfg)
        params = (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)
    elif name == "dense":
        block = Qwen3MoeMLP(cfg, intermediate_size=ffn * top_k)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=hidden**-0.5, generator=gen)
        return block.to(device=device, dtype=dtype)
    else:
        raise ValueError(name)
    with torch.no_grad():
        for p, v in zip(params, (router, gate_up, down)):
            p.copy_(v)
    return block.to(device=device, dtype=dtype)


def make_inputs(shape, dtype, device, seed: int = 1):
    hidden, _, _, _, tokens = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    return x, grad


def step(block, x, grad) -> None:
    for p in block.parameters():
        p.grad = None
    x.grad = None
    block(x).backward(grad)


def timed(block, x, grad, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(block, x, grad)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def batched_mm_bytes(shape, dtype) -> int:
    """batched_mm gathers one (2I x H) and one (H x I) weight slice per token choice, kept for backward."""
    hidden, ffn, _, top_k, tokens = shape
    return 2 * tokens * top_k * 3 * ffn * hidden * torch.finfo(dtype).bits // 8


def available_bytes(device) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


_PEAK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from benchmarks.moe_layer import build, make_inputs, step
torch.set_num_threads({threads})
dtype, shape, device = getattr(torch, {dtype!r}), {shape!r}, {device!r}
block = build({name!r}, shape, dtype, device)
x, grad = make_inputs(shape, dtype, device)
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    step(block, x, grad); torch.cuda.synchronize()
    print(json.dumps((torch.cuda.max_memory_allocated() - base) / 2**20))
else:
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = status("VmRSS")
    step(block, x, grad)
    print(json.dumps((status("VmHWM") - base) / 2**20))
"""


def measure_peak(name: str, shape, dtype_name: str, device: str, threads: int) -> float | None:
    """Peak extra memory (MiB) of one forward+backward (weights, inputs and imports excluded), each contender in a
    fresh process so no allocator cache or scratch buffer of another run is reused. CPU: growth of the peak resident
    set; GPU: growth of torch.cuda.max_memory_allocated."""
    code = _PEAK_SCRIPT.format(root=ROOT, threads=threads, dtype=dtype_name, shape=tuple(shape), device=device, name=name)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, check=True)
        return round(float(json.loads(out.stdout.strip().splitlines()[-1])), 1)
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_shape(shape, args, dtype) -> dict:
    names = ["mose", "mose_grouped_mm", *[f"hf_{i}" for i in HF_IMPLS], "dense"]
    skipped = {}
    if batched_mm_bytes(shape, dtype) > 0.5 * available_bytes(args.device):
        skipped["hf_batched_mm"] = f"needs ~{batched_mm_bytes(shape, dtype) / 2**30:.1f} GiB for gathered weights"
    names = [n for n in names if n not in skipped]
    log(f"shape {shape}: {', '.join(names)}" + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    x, grad = make_inputs(shape, dtype, args.device)
    blocks = {n: build(n, shape, dtype, args.device) for n in names}
    with torch.no_grad():  # same weights -> same outputs (sanity check that the comparison is fair)
        ref = blocks["mose"](x)
        max_diff = {n: float((blocks[n](x) - ref).abs().max()) for n in names if n != "mose" and n != "dense"}
    for n in names:  # warm-up
        for _ in range(args.warmup):
            step(blocks[n], x, grad)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate to spread drift across contenders
        for n in order:
            times[n].append(timed(blocks[n], x, grad, args.device))
        log(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    del blocks
    tokens = shape[4]
    median = {n: statistics.median(t) for n, t in times.items()}
    tps = {n: tokens / median[n] for n in names}
    hf = {n: v for n, v in tps.items() if n.startswith("hf_")}
    best_hf = max(hf, key=hf.get)
    peak = {}
    if args.memory:
        log(f"  peak memory: {', '.join(names)}")
        peak = {n: measure_peak(n, shape, str(dtype).split(".")[-1], args.device, args.threads) for n in names}
    ratio_hf, ratio_dense = tps["mose"] / tps[best_hf], tps["mose"] / tps["dense"]
    return {
        "shape": dict(zip(("hidden", "expert_ffn", "experts", "top_k", "tokens"), shape)),
        "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
        "median_step_s": {n: round(v, 4) for n, v in median.items()},
        "min_step_s": {n: round(min(t), 4) for n, t in times.items()},
        "step_s": {n: [round(t, 4) for t in ts] for n, ts in times.items()},
        "skipped": skipped,
        "best_transformers": best_hf[3:],
        "ratio_vs_best_transformers": round(ratio_hf, 3),
        "ratio_vs_dense": round(ratio_dense, 3),
        "transformers_best_vs_dense": round(tps[best_hf] / tps["dense"], 3),
        "ratios_vs_each": {n: round(tps["mose"] / v, 3) for n, v in tps.items() if n != "mose"},
        # median over rounds of the within-round ratio: contenders of one round ran back to back, so slow drifts in
        # the machine's load cancel better than in the ratio of medians above
        "paired_ratios_vs_each": {
            n: round(statistics.median(t / m for t, m in zip(times[n], times["mose"])), 3) for n in names if n != "mose"
        },
        "peak_mem_mib": peak,
        "max_abs_diff_vs_transformers": max_diff,
        "targets_met": {"vs_transformers": ratio_hf >= TARGET_VS_TRANSFORMERS, "vs_dense": ratio_dense >= TARGET_VS_DENSE},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak memory in fresh subprocesses (default: on, off with --quick)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.memory = (not args.quick) if args.memory is None else args.memory
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = [bench_shape(s, args, dtype) for s in shapes]
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "moe_layer forward+backward",
        "load_average_1_5_15min": {  # other processes competing for the CPU make absolute numbers noisy
            "start": [round(v, 2) for v in load_start] if load_start else None,
            "end": [round(v, 2) for v in load] if load else None,
        },
        "logical_cpus": os.cpu_count(),
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "targets": {"vs_best_transformers": TARGET_VS_TRANSFORMERS, "vs_dense": TARGET_VS_DENSE},
        "all_targets_met": all(all(r["targets_met"].values()) for r in results),
        "shapes": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
