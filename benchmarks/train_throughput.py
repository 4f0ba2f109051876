"""Training-step throughput (tokens/s) of the tiny preset: MoE vs the same model dense, plain PyTorch vs DeepSpeed ZeRO-2
and ZeRO-3, on this machine. Prints JSON.

One step = forward + backward + AdamW update of every parameter, on a fixed batch of B sequences of T tokens with one
image each (the tiny preset's 16 image tokens per image), fp32 on CPU (bf16 on a GPU that supports it).
  - dense: the tiny preset's base LLaVA (SigLIP + Qwen2) before upcycling;
  - moe:   the same model upcycled (`mose.upcycle`): 4 experts, top-2, every other decoder layer.
Backends: "plain" (torch AdamW on the module), "zero2" / "zero3" (a DeepSpeed engine from the shipped
training/deepspeed/zero{2,3}.json, single process, gloo on CPU). Each contender runs `--warmup` steps, then
`--repeats` timed blocks of `--steps` steps, interleaved round-robin so that ratios come from the same machine state;
tokens/s is the median over blocks. GPU MFU is reported as "not measured" unless run on a GPU.

    python benchmarks/train_throughput.py                 # B=4, T=512, 2 threads
    python benchmarks/train_throughput.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(kind: str, seed: int = 0):
    """dense = the preset's base VLM; moe = the same weights upcycled (identical outputs at initialisation)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from mose.modeling import upcycle
    from mose.presets import PRESETS, base_config

    torch.manual_seed(seed)
    dense = AutoModelForImageTextToText.from_config(base_config("tiny"))
    if kind == "dense":
        return dense
    return upcycle(dense, seed=seed, **PRESETS["tiny"].moe_options)


def make_batch(model, batch: int, seq: int, seed: int = 0):
    import torch

    cfg = model.config if not hasattr(model.config, "base_config") else model.config.base_config
    n_img, vocab, image_id = cfg.image_seq_length, cfg.text_config.vocab_size, cfg.image_token_index
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 1, (batch, seq), generator=g)
    ids[ids == image_id] = 3
    ids[:, 1 : 1 + n_img] = image_id
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    v = cfg.vision_config
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels}


def ds_config(path: str, model, batch: int, bf16: bool) -> dict:
    with open(path) as f:
        cfg = json.load(f)
    h = model.config.get_text_config(decoder=True).hidden_size
    zero = cfg["zero_optimization"]
    for key, value in {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                       "stage3_param_persistence_threshold": 10 * h}.items():
        if zero.get(key) == "auto":
            zero[key] = value
    cfg.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1, train_batch_size=batch, gradient_clipping=1.0,
               zero_allow_untested_optimizer=True)
    cfg["bf16"] = {"enabled": bf16}
    return cfg


class Contender:
    """One (model kind, backend) pair, ready to run training steps."""

    def __init__(self, kind: str, backend: str, batch: int, seq: int, device: str, bf16: bool):
        import torch

        self.kind, self.backend = kind, backend
        model = build(kind)
        model.train()
        self.batch = {k: v.to(device) for k, v in make_batch(model, batch, seq).items()}
        self.tokens = int(self.batch["attention_mask"].sum())
        self.dispatch = None
        if kind == "moe":
            from mose.expert_dispatch import resolve_dispatch

            block = model.moe_blocks()[0].experts

            def record(module, args):  # which expert kernel this step's first MoE layer runs (args: x, top_w, plan)
                x, plan = args[0], args[2]
                try:
                    self.dispatch = resolve_dispatch(module.dispatch, plan.token.numel(), x, module.gate_up_proj, module.down_proj)
                except TypeError:  # another mose.expert_dispatch version
                    self.dispatch = f"{module.dispatch} (unresolved)"

            block.register_forward_pre_hook(record)
        if backend == "plain":
            self.model = model.to(device, dtype=torch.bfloat16 if bf16 else torch.float32)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
            self.engine = None
        else:
            import deepspeed

            path = os.path.join(ROOT, "training", "deepspeed", f"{backend}.json")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            self.engine, self.opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(path, model, batch, bf16))
            if bf16:
                self.batch["pixel_values"] = self.batch["pixel_values"].bfloat16()

    def step(self) -> float:
        import torch

        if self.engine is None:
            loss = self.model(**self.batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            loss = self.engine(**self.batch).loss
            self.engine.backward(loss)
            self.engine.step()
        return float(loss.detach())

    def close(self):
        if self.engine is not None:
            self.engine.destroy()


def main(argv=None) -> int:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; keep stdout for the JSON
        report = measure(argv)
    print(json.dumps(report, indent=2))
    return 0


def measure(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="plain,zero2,zero3")
    parser.add_argument("--quick", action="store_true", help="B=2, T=128, 1 step x 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps, args.repeats, args.warmup = 2, 128, 1, 2, 1

    from training.runner import ensure_distributed_env

    ensure_distributed_env()
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    t0 = time.perf_counter()
    contenders = [Contender(k, b, args.batch, args.seq, device, bf16) for b in backends for k in ("dense", "moe")]
    setup_s = time.perf_counter() - t0
    for c in contenders:
        for _ in range(args.warmup):
            c.step()
    times: dict[tuple, list[float]] = {(c.kind, c.backend): [] for c in contenders}
    losses: dict[tuple, float] = {}
    for _ in range(args.repeats):
        for c in contenders:  # round-robin: every contender sees the same machine state
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                losses[(c.kind, c.backend)] = c.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[(c.kind, c.backend)].append((time.perf_counter() - t) / args.steps)
    results = {}
    for c in contenders:
        step_s = statistics.median(times[(c.kind, c.backend)])
        results.setdefault(c.backend, {})[c.kind] = {
            "tokens_per_s": round(c.tokens / step_s, 1), "step_ms": round(1000 * step_s, 2), "tokens_per_step": c.tokens,
            "step_ms_all": [round(1000 * s, 2) for s in times[(c.kind, c.backend)]], "last_loss": round(losses[(c.kind, c.backend)], 4),
            **({"expert_dispatch": c.dispatch} if c.kind == "moe" else {}),
        }
        c.close()
    ratios = {f"moe_vs_dense_{b}": round(r["moe"]["tokens_per_s"] / r["dense"]["tokens_per_s"], 3) for b, r in results.items()}
    for b in results:
        if b != "plain" and "plain" in results:
            for k in ("dense", "moe"):
                ratios[f"{b}_vs_plain_{k}"] = round(results[b][k]["tokens_per_s"] / results["plain"][k]["tokens_per_s"], 3)
    from mose.presets import count_parameters, preset_config

    counts = count_parameters(preset_config("tiny"))
    return {
        "benchmark": "train_throughput", "preset": "tiny", "device": device, "dtype": "bf16" if bf16 else "fp32",
        "threads": args.threads, "batch": args.batch, "seq": args.seq, "steps_per_block": args.steps, "repeats": args.repeats,
        "moe_params": counts, "results": results, "ratios": ratios, "setup_s": round(setup_s, 1),
        "gpu_mfu": "not measured" if device == "cpu" else "not measured (this script times the tiny preset only)",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
    }


if __name__ == "__main__":
    sys.exit(main())
