"""The plain torch router-pretraining loop of the benchmark benchmarks/router_pretrain.py.

    ds, _ = build_skill_dataset(items, processor, taxonomy)                 # mose/skill_data.py
    collate = SkillCollator(processor)
    before = evaluate_routing(model, held_out, collate, taxonomy)           # mose/routing_eval.py
    history = pretrain_router(model, ds, collate, steps=200, lr=1e-3, trainable="moe", random_state=0)
    after = evaluate_routing(model, held_out, collate, taxonomy)
    usage_heatmap(after, taxonomy, model.config.skill_groups, "usage.png")

Training minimises the LM loss plus the model's routing losses (`out.loss`: balance + z-loss + the hierarchical
skill loss, which pulls each labelled token's router mass into its fine skill's expert group and its coarse
parent's group). `skill_loss=False` trains on the same batches without `skill_labels` (the baseline the
benchmark compares the LM loss against). The `mose train` stages (training/) feed the same dataset and collator to the
DeepSpeed stage runner; this loop is the benchmark's own.
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, RandomSampler

from mose.routing_eval import batch_to

TRAINABLE = ("router", "moe", "all")


def trainable_parameters(model, which: str = "moe") -> list[torch.nn.Parameter]:
    """Set requires_grad: "router" (routers only), "moe" (routers + experts + shared experts) or "all"."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {which!r}")
    for p in model.parameters():
        p.requires_grad_(which == "all")
    if which != "all":
        for block in model.moe_blocks():
            mods = [block.router] if which == "router" else [block]
            for m in mods:
                for p in m.parameters():
                    p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def pretrain_router(model, dataset, collator, *, steps: int, lr: float = 1e-3, batch_size: int = 4, trainable: str = "moe",
                    skill_loss: bool = True, skill_loss_coef: float | None = None, sampler=None, weight_decay: float = 0.0,
                    grad_clip: float | None = 1.0, random_state: int = 0, log_every: int = 10, progress: bool = True) -> list[dict]:
    """Train for `steps` optimizer steps (AdamW); returns the log history (step, loss, lm_loss, aux_loss, skill stats).

    `sampler`: e.g. a `SkillBalancedSampler` over `dataset`; default: shuffled epochs seeded by `random_state`.
    `skill_loss_coef` overrides `model.config.skill_loss_coef` for this run (restored afterwards).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(random_state)
    params = trainable_parameters(model, trainable)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(random_state)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler or RandomSampler(dataset, generator=g),
                        collate_fn=collator, drop_last=False)
    old_coef = model.config.skill_loss_coef
    if skill_loss_coef is not None:
        model.config.skill_loss_coef = float(skill_loss_coef)
    device = next(model.parameters()).device
    model.train()
    history, step, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=steps, desc="router pretraining", disable=not progress)
    try:
        while step < steps:
            for batch in loader:
                batch = batch_to(batch, device)
                skills = batch.pop("skill_labels")
                out = model(**batch, skill_labels=skills if skill_loss else None)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"router pretraining: non-finite loss {float(out.loss)} at step {step}")
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                step += 1
                bar.update(1)
                if step % log_every == 0 or step == steps:
                    rec = {"step": step, "loss": out.loss.item(), "lm_loss": out.lm_loss.item(), "aux_loss": out.aux_loss.item(),
                           "balance": float(out.router_stats["balance"].mean()), "seconds": round(time.perf_counter() - t0, 2)}
                    if "skill_loss" in out.router_stats:
                        rec["skill_loss"] = float(out.router_stats["skill_loss"].mean())
                        rec["skill_topk_accuracy"] = float(out.router_stats["skill_accuracy"].mean())
                    history.append(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if step >= steps:
                    break
    finally:
        bar.close()
        model.config.skill_loss_coef = old_coef
    return history


__all__ = ["TRAINABLE", "trainable_parameters", "pretrain_router"]
