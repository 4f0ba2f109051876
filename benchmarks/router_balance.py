"""Expert balance: the aux-loss router against the aux-loss-free router (DeepSeek-V3), same model, data and steps. JSON.

    python benchmarks/router_balance.py [--steps 200] [--batch-size 8] [--seq 64] [--num-experts 8] [--top-k 2]

One tiny-preset initialisation (text only, random init, every MoE layer dropless), two runs over the same batches:
- aux_loss: `balancing="aux_loss"`, balance loss weight --balance-coef (the package default 1e-2);
- aux_free: `balancing="aux_free"`, balance loss weight 0, bias rate --rate (DeepSeek-V3's gamma = 1e-3), the bias
  updated once per optimizer step (`mose.moe.update_aux_free_bias`, as `training.trainer.AuxFreeBiasCallback` does).
Both keep the z-loss (1e-3). Data: synthetic token sequences with a Zipf-distributed (skewed) vocabulary and a
first-order Markov structure, so some tokens are far more frequent than others (what unbalances a learned router).
--router-std scales the routers' initial weights (0.02 = the upcycling init; larger = a sharper, more skewed start).

Per step and run: balance E * sum_e f_e P_e (mean over MoE layers; 1 = balanced), max and min expert load relative to
the uniform share (mean over layers; 1 = balanced), LM loss. Summary: means over the last quarter of the steps, and
the same statistics on held-out batches after training (evaluation mode; the aux-free bias applies).
Measured figures (300 steps, rates 1e-3 / 3e-3 / 1e-2): docs/methods/mose_model.md, "Aux-loss-free balancing".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def token_stream(n: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """(n, seq) token ids: Zipf(1.2)-distributed innovations over a first-order Markov chain (ids >= 10)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab - 10 + 1, dtype=torch.float64)
    zipf = ranks.pow(-1.2)
    zipf /= zipf.sum()
    noise = torch.multinomial(zipf, n * seq, replacement=True, generator=g).view(n, seq)
    ids = torch.empty(n, seq, dtype=torch.long)
    ids[:, 0] = noise[:, 0]
    for t in range(1, seq):  # half of the positions follow the previous token deterministically
        follow = torch.rand(n, generator=g) < 0.5
        ids[:, t] = torch.where(follow, (ids[:, t - 1] * 7 + 3) % (vocab - 10), noise[:, t])
    return ids + 10


def layer_stats(out, num_experts: int) -> dict:
    s = out.router_stats
    load = s["expert_load"] * num_experts  # (L, E), 1 = uniform share
    return {"balance": float(s["balance"].mean()), "max_load": float(load.max(-1).values.mean()),
            "min_load": float(load.min(-1).values.mean())}


def run(label: str, state: dict, batches, held_out, args) -> dict:
    from mose.moe import update_aux_free_bias
    from mose.presets import build_preset

    aux_free = label == "aux_free"
    model = build_preset("tiny", seed=args.seed, **options(args, aux_free))
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.endswith("expert_bias") for k in missing), missing  # the aux-free buffers start at zero
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    history, t0 = [], time.perf_counter()
    for step, ids in enumerate(batches):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        (out.lm_loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if aux_free:
            update_aux_free_bias(model, args.rate)
        history.append({"step": step, "lm_loss": round(float(out.lm_loss.detach()), 4),
                        **{k: round(v, 4) for k, v in layer_stats(out, args.num_experts).items()}})
    wall = time.perf_counter() - t0
    model.eval()
    ev = {"balance": 0.0, "max_load": 0.0, "min_load": 0.0, "lm_loss": 0.0}
    with torch.no_grad():
        for ids in held_out:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
            for k, v in layer_stats(out, args.num_experts).items():
                ev[k] += v / len(held_out)
            ev["lm_loss"] += float(out.lm_loss) / len(held_out)
    tail = history[-max(1, len(history) // 4):]
    last = {k: round(sum(h[k] for h in tail) / len(tail), 4) for k in ("balance", "max_load", "min_load", "lm_loss")}
    bias = [blk.router.expert_bias.tolist() for blk in model.moe_blocks()] if aux_free else None
    return {"last_quarter_mean": last, "held_out": {k: round(v, 4) for k, v in ev.items()}, "train_seconds": round(wall, 2),
            "history": history, "final_bias": bias}


def options(args, aux_free: bool) -> dict:
    return {"num_experts": args.num_experts, "top_k": args.top_k, "moe_layers": "all",
            "balancing": "aux_free" if aux_free else "aux_loss", "aux_free_rate": args.rate,
            "router_balance_coef": 0.0 if aux_free else args.balance_coef, "router_z_loss_coef": 1e-3, "skill_loss_coef": 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balance-coef", type=float, default=1e-2)
    ap.add_argument("--rate", type=float, default=1e-3)
    ap.add_argument("--router-std", type=float, default=0.02)
    ap.add_argument("--held-out-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mose.presets import build_preset

    t_start = time.perf_counter()
    base = build_preset("tiny", seed=args.seed, **options(args, False))
    with torch.no_grad():
        g = torch.Generator().manual_seed(args.seed + 1)
        for blk in base.moe_blocks():
            blk.router.weight.copy_(torch.randn(blk.router.weight.shape, generator=g) * args.router_std)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    vocab = base.config.get_text_config(decoder=True).vocab_size
    n = args.steps * args.batch_size
    batches = token_stream(n, args.seq, vocab, args.seed + 2).split(args.batch_size)
    held_out = token_stream(args.held_out_batches * args.batch_size, args.seq, vocab, args.seed + 3).split(args.batch_size)
    runs = {label: run(label, state, batches, held_out, args) for label in ("aux_loss", "aux_free")}
    a, f = runs["aux_loss"], runs["aux_free"]
    summary = {
        "baseline": "aux_loss",
        "last_quarter": {"aux_loss": a["last_quarter_mean"], "aux_free": f["last_quarter_mean"]},
        "held_out": {"aux_loss": a["held_out"], "aux_free": f["held_out"]},
        "aux_free_balance_at_least_as_good": {
            "last_quarter": f["last_quarter_mean"]["balance"] <= a["last_quarter_mean"]["balance"],
            "held_out": f["held_out"]["balance"] <= a["held_out"]["balance"],
            "held_out_max_load": f["held_out"]["max_load"] <= a["held_out"]["max_load"],
        },
        "lm_loss_ratio_aux_free_over_aux_loss_held_out": round(f["held_out"]["lm_loss"] / a["held_out"]["lm_loss"], 4),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    print(json.dumps({"summary": summary, "config": vars(args), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
