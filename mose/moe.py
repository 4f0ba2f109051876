"""The MoSE sparse mixture-of-experts block: router, fused experts, routing losses and trace.

Shapes: N tokens (batch x sequence flattened), H hidden size, I expert FFN width, E experts, k = top-k,
S = number of kept (token, expert) choices (N * k when dropless).

The expert computation itself (dispatch plans, the "grouped_mm" / "sort" / "eager" / "auto" dispatch implementations,
their autograd Function and the CPU expert threads) is in mose/expert_dispatch.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .expert_dispatch import DispatchPlan, expert_capacity, make_plan, run_experts

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------------------


BALANCING = ("aux_loss", "aux_free")


class MoSERouter(nn.Module):
    """Linear router without bias: softmax over experts, top-k, weights renormalised over the chosen k.

    balancing="aux_free" (DeepSeek-V3, arXiv:2412.19437, Sec. 2.1.2 "Auxiliary-Loss-Free Load Balancing"): a
    per-expert bias `expert_bias` (E,) (a buffer: saved in checkpoints, never trained by the gradient) is added to the
    routing probabilities ONLY to choose the top-k experts; the gate weights of the chosen experts are the unbiased
    probabilities, renormalised over the k chosen, as without the bias. The bias moves once per optimizer step, outside
    the gradient, by `update_aux_free_bias` from the expert loads accumulated in `load_counts` (see there). The bias
    also applies in evaluation and generation (it is part of the routing, as in DeepSeek-V3's inference).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, jitter: float = 0.0, balancing: str = "aux_loss"):
        super().__init__()
        if balancing not in BALANCING:
            raise ValueError(f"MoSERouter: balancing must be one of {BALANCING}, got {balancing!r}.")
        self.num_experts, self.top_k, self.jitter, self.balancing = num_experts, top_k, jitter, balancing
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        if balancing == "aux_free":  # registered only then: default checkpoints keep their exact key set
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            # top-k choices per expert since the last bias update (not saved: a step's counts never outlive the step)
            self.register_buffer("load_counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # hidden_states: (N, H)
        if self.training and self.jitter > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            hidden_states = hidden_states * noise
        logits = F.linear(hidden_states.float(), self.weight.float())  # (N, E), fp32 for a stable softmax
        probs = logits.softmax(dim=-1)
        if self.balancing == "aux_free":
            # DeepSeek-V3 eq. (16): the bias only decides the selection; eq. (13) takes the gate from the raw affinity
            top_i = (probs.detach() + self.expert_bias.float()).topk(self.top_k, dim=-1).indices  # (N, k)
            top_w = probs.gather(1, top_i)
        else:
            top_w, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, top_w, top_i

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() (DeepSpeed bf16) would also cast the buffers: a bf16 bias cannot take 1e-3 steps
        # near 0.1 exactly and bf16 counts stop at 256, so the aux-free state keeps its own precision on any device
        super()._apply(fn, recurse)
        if self.balancing == "aux_free":
            if self.expert_bias.dtype != torch.float32:
                self.expert_bias = self.expert_bias.float()
            if self.load_counts.dtype != torch.float64:
                self.load_counts = self.load_counts.double()
        return self

    @torch.no_grad()
    def count_load(self, top_i: torch.Tensor) -> None:
        """Add one micro-batch's top-k choices (real tokens only) to `load_counts` (aux_free only)."""
        self.load_counts += torch.bincount(top_i.reshape(-1), minlength=self.num_experts).to(self.load_counts)


@torch.no_grad()
def update_aux_free_bias(model: nn.Module, rate: float) -> int:
    """One aux-loss-free bias update for every aux_free router of `model`; returns how many routers moved.

    Per router, from the counts c_e of the step (all micro-batches of the optimizer step, summed over data-parallel
    processes with one all-reduce when torch.distributed is initialised, so every rank keeps the same bias):
    b_e += rate * sign(mean(c) - c_e)  (DeepSeek-V3 Sec. 2.1.2: "decrease the bias term by gamma if its corresponding
    expert is overloaded and increase it by gamma if its corresponding expert is underloaded"). The counts are then
    reset. A router that saw no token this step is left unchanged.
    """
    routers = [m for m in model.modules() if isinstance(m, MoSERouter) and m.balancing == "aux_free"]
    if not routers:
        return 0
    counts = torch.stack([r.load_counts.to(torch.float64).cpu() for r in routers])  # (R, E)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        counts = counts.to(dev)
        dist.all_reduce(counts)
        counts = counts.cpu()
    moved = 0
    for r, c in zip(routers, counts):
        if c.sum() > 0:
            delta = rate * torch.sign(c.mean() - c)
            r.expert_bias += delta.to(r.expert_bias)
            moved += 1
        r.load_counts.zero_()
    return moved


# --------------------------------------------------------------------------------------------------------------
# Experts and the sparse block
# --------------------------------------------------------------------------------------------------------------


class MoSEExperts(nn.Module):
    """E SwiGLU experts stored as fused 3-D weights: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dispatch: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.dispatch = dispatch
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, hidden_states: torch.Tensor, top_w: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # hidden_states (N, H), top_w (N, k) routing weights -> (N, H)
        gate_up, down = self.gate_up_proj, self.down_proj
        x = hidden_states.to(gate_up.dtype)
        weights = top_w.to(gate_up.dtype).reshape(-1)[plan.choice]  # (S,) routing weight of each sorted row
        out = run_experts(x, gate_up, down, weights, plan, self.dispatch)
        return out.to(hidden_states.dtype)


class MoSESharedExpert(nn.Module):
    """An always-on SwiGLU FFN (same parameter names as the Hugging Face decoder MLPs, so LoRA can target it)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RoutingRecord:
    """What one MoE layer's router did in one forward call (kept for losses, statistics and the trace)."""

    layer_idx: int
    logits: torch.Tensor  # (N, E) fp32 router logits
    top_w: torch.Tensor  # (N, k) renormalised routing weights
    top_i: torch.Tensor  # (N, k) chosen experts


class RoutingRecorder:
    """Collects `RoutingRecord`s from the MoE blocks during one model forward (set on the blocks by the model)."""

    def __init__(self):
        self.records: list[RoutingRecord] = []

    def record(self, record: RoutingRecord) -> None:
        self.records.append(record)


class MoSESparseBlock(nn.Module):
    """Drop-in replacement for a decoder FFN: router + E routed experts (+ optional shared expert).

    forward(hidden_states (..., H)) -> (..., H). When `self.recorder` is set (by `MoSEForConditionalGeneration`),
    the router's logits and choices are recorded so the model can compute routing losses outside any
    gradient-checkpointed region.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        shared_expert: bool = False,
        shared_intermediate_size: int | None = None,
        router_jitter: float = 0.0,
        dispatch: str = "auto",
        capacity_factor: float | None = None,
        layer_idx: int = 0,
        balancing: str = "aux_loss",
    ):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor, self.layer_idx = num_experts, top_k, capacity_factor, layer_idx
        self.router = MoSERouter(hidden_size, num_experts, top_k, router_jitter, balancing)
        self.experts = MoSEExperts(num_experts, hidden_size, intermediate_size, dispatch)
        self.shared_expert = (
            MoSESharedExpert(hidden_size, shared_intermediate_size or intermediate_size) if shared_expert else None
        )
        self.recorder: RoutingRecorder | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        logits, top_w, top_i = self.router(x)  # (N, E), (N, k), (N, k)
        # capacity limits apply in training only; evaluation and generation are always dropless
        cap = expert_capacity(x.shape[0], self.top_k, self.num_experts, self.capacity_factor) if self.training else None
        plan = make_plan(top_i, self.num_experts, cap)
        out = self.experts(x, top_w, plan)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if self.recorder is not None:
            self.recorder.record(RoutingRecord(self.layer_idx, logits, top_w, top_i))
        return out.view(shape)


# --------------------------------------------------------------------------------------------------------------
# Routing losses and statistics (per layer; `mask` (N,) bool selects real tokens, e.g. not padding)
# --------------------------------------------------------------------------------------------------------------


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t[mask]


def load_balance_loss(logits: torch.Tensor, top_i: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e (Switch / GShard): 1.0 when routing is perfectly balanced, up to E when it collapses.

    f_e: fraction of the top-k choices sent to expert e; P_e: mean router probability of expert e.
    """
    logits, top_i = _masked(logits, mask), _masked(top_i, mask)
    num_experts = logits.shape[-1]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    probs = logits.softmax(dim=-1)  # (n, E)
    f = torch.bincount(top_i.reshape(-1), minlength=num_experts).to(probs.dtype) / top_i.numel()  # (E,)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small."""
    logits = _masked(logits, mask)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


def routing_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution; log(E) = uniform, 0 = one-hot."""
    logits = _masked(logits, mask)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def skill_group_matrix(skill_groups: dict[str, list[int]], num_experts: int, device=None) -> torch.Tensor:
    """(num_skills, E) bool: expert e serves skill s (skill ids follow the dict's order)."""
    groups = torch.zeros(len(skill_groups), num_experts, dtype=torch.bool, device=device)
    for s, experts in enumerate(skill_groups.values()):
        groups[s, list(experts)] = True
    return groups


def skill_routing_loss(
    logits: torch.Tensor, skill_labels: torch.Tensor, groups: torch.Tensor, parents: torch.Tensor
) -> torch.Tensor:
    """Hierarchical skill loss: -log(router probability mass on the token's skill group), fine + coarse level.

    logits (N, E); skill_labels (N,) skill id or -100 (ignored); groups (num_skills, E) bool; parents (num_skills,)
    parent skill id or -1. The loss sums the fine term and, for skills with a parent, the coarse term; 0 when no
    token is labelled.
    """
    valid = skill_labels != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.new_zeros(())
    logp = logits[valid].log_softmax(dim=-1)  # (V, E)
    fine = skill_labels[valid]
    neg_inf = torch.finfo(logp.dtype).min
    loss = -torch.logsumexp(logp.masked_fill(~groups[fine], neg_inf), dim=-1).mean()
    parent = parents[fine]
    has_parent = parent >= 0
    if bool(has_parent.any()):
        coarse = logp[has_parent].masked_fill(~groups[parent[has_parent]], neg_inf)
        loss = loss - torch.logsumexp(coarse, dim=-1).mean()
    return loss


def skill_routing_accuracy(top_i: torch.Tensor, skill_labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Fraction of labelled tokens whose top-1 expert lies in the token's (fine) skill group (0 if none labelled).

    The skill loss puts probability mass on the group, which decides the top-1 choice; how the remaining k-1 choices
    spread inside or outside a group is left to the balance loss.
    """
    valid = skill_labels != IGNORE_INDEX
    if not bool(valid.any()):
        return torch.zeros((), device=top_i.device)
    in_group = groups[skill_labels[valid]].gather(1, top_i[valid][:, :1])  # (V, 1)
    return in_group.float().mean()


# --------------------------------------------------------------------------------------------------------------
# Routing trace
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RoutingTrace:
    """Per MoE layer and token: the chosen experts and their weights.

    layers: decoder layer index of each MoE layer; experts / weights: (L, B, T, k).
    """

    layers: list[int]
    experts: torch.Tensor
    weights: torch.Tensor
    num_experts: int

    def expert_usage(self, skill_labels: torch.Tensor, num_skills: int, weighted: bool = False) -> torch.Tensor:
        """(L, num_skills, E): per layer and skill, the share of the skill's token choices sent to each expert.

        skill_labels (B, T) with -100 for unlabelled tokens. Rows of skills without tokens are zero.
        """
        num_layers, num_experts = self.experts.shape[0], self.num_experts
        experts = self.experts.reshape(num_layers, -1, self.experts.shape[-1]).cpu()  # (L, N, k)
        weights = self.weights.reshape(experts.shape).float().cpu() if weighted else torch.ones(experts.shape)
        labels = skill_labels.reshape(-1).cpu()
        if labels.numel() != experts.shape[1]:
            raise ValueError(f"skill_labels has {labels.numel()} tokens, the trace has {experts.shape[1]}.")
        valid = labels != IGNORE_INDEX
        usage = torch.zeros(num_layers, num_skills, num_experts)
        lab = labels[valid].unsqueeze(1).expand(-1, experts.shape[-1])  # (V, k)
        for layer in range(num_layers):
            flat = (lab * num_experts + experts[layer][valid]).reshape(-1)
            usage[layer] = torch.bincount(flat, weights[layer][valid].reshape(-1), minlength=num_skills * num_experts).view(
                num_skills, num_experts
            )
        return usage / usage.sum(-1, keepdim=True).clamp_min(1e-12)


__all__ = [
    "BALANCING", "MoSERouter", "update_aux_free_bias", "MoSEExperts", "MoSESharedExpert", "MoSESparseBlock", "RoutingRecord", "RoutingRecorder", "RoutingTrace",
    "load_balance_loss", "router_z_loss", "routing_entropy", "skill_group_matrix", "skill_routing_loss",
    "skill_routing_accuracy", "IGNORE_INDEX",
]
