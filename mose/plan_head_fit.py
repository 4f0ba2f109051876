"""Refit the planning head on frozen features, full batch, after joint training (the "head" trajectory decoder).

Why: trained jointly with the LM on small batches (4 items in the demo and the planning benchmark), the head's
AdamW steps follow one noisy residual after another while the features under it move, and it ends where it started
or worse: on the tiny preset (668 training scenes, 300 steps) the jointly trained head planned 2.09 m ADE on its own
training scenes and 2.04 m held out, against 1.99 / 1.93 m for its constant-velocity prior. The features themselves
carry the plan: a linear probe on them names the route command of 100 % of held-out scenes, and the same head
trained full-batch on the same frozen features reaches 1.67 m held out (benchmarks/planning.py measures the EPDMS).
So, after the LM has trained, one forward pass collects every training item's plan features (`plan_inputs`) and
`fit_plan_head` trains the head alone on all of them at once: full-batch AdamW, the joint loss (smooth-L1 on the
residual to the prior), a fixed number of steps. This two-phase readout (features learned jointly, the readout
fitted on frozen features) is our choice; the head's loss during joint training still shapes the features.

Defaults (config keys `plan_refit.steps`, `plan_refit.lr`, `plan_refit.weight_decay` of a training stage): 1000
steps, lr 3e-3, weight decay 0.01; 0 steps turns the refit off. Chosen on held-out ADE of the tiny preset (lr 1e-2
and 3e-3 tie; 1e-3 needs more steps; weight decay 0.1 changes nothing).
"""
from __future__ import annotations

import torch

from .trajectory_decoders import constant_velocity_prior, plan_features, plan_loss


@torch.no_grad()
def plan_inputs(model, dataset, collate, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, 2H + 1), prior (N, 8, 2), targets (N, 8, 2)) of the dataset's items that have a plan target
    (`collate` must be a `SkillCollator(..., plan=True)`), through the model's forward pass in eval mode."""
    if getattr(model, "plan_head", None) is None:
        raise ValueError("plan_inputs: the model has no planning head (config.trajectory_decoder must be 'head')")
    was_training = model.training
    model.eval()
    captured, feats, priors, targets = {}, [], [], []
    hook = model.vlm.get_decoder().register_forward_hook(
        lambda _m, _a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out.last_hidden_state))
    device = next(model.parameters()).device
    # only step-by-step items carry a plan target: the QA items need no forward pass
    order = [i for i in range(len(dataset)) if dataset[i].get("kind", "hierarchical") == "hierarchical"]
    try:
        for start in range(0, len(order), batch_size):
            batch = collate([dataset[i] for i in order[start:start + batch_size]])
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            # only what the features need: no labels (no LM or skill loss to compute), no targets (no plan loss)
            model(**{k: v for k, v in batch.items() if k not in ("labels", "skill_labels", "plan_targets")})
            speed, index, target = batch["ego_speed"].float(), batch["plan_index"].long(), batch["plan_targets"].float()
            keep = (index >= 0) & torch.isfinite(speed) & torch.isfinite(target).flatten(1).all(dim=1)
            f = plan_features(captured["h"], index, batch.get("attention_mask"), speed)
            feats.append(f[keep].float().cpu())
            priors.append(constant_velocity_prior(speed[keep].cpu(), target.shape[1]))
            targets.append(target[keep].cpu())
    finally:
        hook.remove()
        model.train(was_training)
    if not feats or sum(len(f) for f in feats) == 0:
        raise ValueError("plan_inputs: no item has a plan target (an ego speed and a complete [trajectory])")
    return torch.cat(feats), torch.cat(priors), torch.cat(targets)


def fit_plan_head(head, features: torch.Tensor, prior: torch.Tensor, targets: torch.Tensor, *, steps: int = 1000, lr: float = 3e-3,
                  weight_decay: float = 0.01) -> dict:
    """Train `head` (a PlanningHead) alone, full batch, on frozen features; returns the loss before and after.

    The steps train detached copies of the head's weights (torch.func.functional_call), written back at the end: a
    training engine may still hold gradient hooks on the head's own parameters (DeepSpeed ZeRO's reduce hooks), and
    those must not fire for a fit the engine knows nothing of."""
    if steps < 0 or not lr > 0 or not weight_decay >= 0:
        raise ValueError(f"fit_plan_head: steps >= 0, lr > 0 and weight_decay >= 0 expected, got {steps}, {lr}, {weight_decay}")
    from torch.func import functional_call

    dtype = head.fc_in.weight.dtype
    device = head.fc_in.weight.device
    x, p, y = features.to(device, dtype), prior.to(device), targets.to(device)
    mask = torch.ones(len(x), dtype=torch.bool, device=device)
    weights = {n: w.detach().clone().requires_grad_(True) for n, w in head.named_parameters()}

    def loss_now():
        return plan_loss(functional_call(head, weights, (x,)).float(), p, y, mask)

    was_training = head.training
    head.train()
    with torch.no_grad():
        before = float(loss_now())
    opt = torch.optim.AdamW(list(weights.values()), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_now()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = float(loss_now())
        for n, w in head.named_parameters():
            w.copy_(weights[n])
    head.train(was_training)
    return {"items": len(x), "steps": steps, "lr": lr, "weight_decay": weight_decay, "loss_before": round(before, 5), "loss_after": round(after, 5)}


__all__ = ["plan_inputs", "fit_plan_head"]
