"""Routing evaluation: whether a model's routers send each skill's tokens to its expert group.

    before = evaluate_routing(model, held_out, collate, taxonomy)           # held_out: build_skill_dataset (mose/skill_data.py)
    ...train...
    after = evaluate_routing(model, held_out, collate, taxonomy)
    usage_heatmap(after, taxonomy, model.config.skill_groups, "usage.png")

Routing accuracy (our definition; the paper reports none): over MoE layers and labelled tokens, the share whose
top-1 expert lies in the expert group of the token's coarse skill (coarse) or of its own fine skill (fine;
only tokens labelled with a non-root skill). Balance: the Switch/GShard E * sum_e f_e P_e per layer (1.0 =
perfectly balanced) and the per-expert load. The reference a learned router must beat (`token_identity_accuracy`):
the best router that sees only each token's identity (per token id, the expert serving most of its training
tokens), scored the same way: it shows how much of the accuracy the token alone explains. Used by the demo's routing step and the router-pretraining benchmark
(benchmarks/router_pretrain.py; its plain torch training loop is benchmarks/router_pretrain_loop.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from mose.moe import skill_group_matrix
from mose.skill_data import IGNORE
from mose.skills import Taxonomy


@dataclass
class RoutingMetrics:
    """Held-out routing quality of one model on one dataset."""

    coarse_accuracy: float
    fine_accuracy: float
    coarse_tokens: int  # labelled token x MoE layer pairs counted
    fine_tokens: int
    per_layer: dict  # decoder layer -> {"coarse": acc, "fine": acc}
    per_skill: dict  # skill -> accuracy of its tokens in its own group (top-1)
    usage: np.ndarray  # (num_skills, E) share of each skill's top-k choices per expert, over layers
    expert_load: np.ndarray  # (E,) share of all real tokens' choices per expert, mean over layers
    balance: float  # mean over layers of E * sum f_e P_e (1.0 = balanced)
    lm_loss: float  # token-weighted mean next-token loss
    lm_tokens: int

    def as_dict(self) -> dict:
        return {
            "coarse_accuracy": round(self.coarse_accuracy, 4), "fine_accuracy": round(self.fine_accuracy, 4),
            "coarse_tokens": self.coarse_tokens, "fine_tokens": self.fine_tokens, "per_layer": self.per_layer,
            "per_skill": {k: round(v, 4) for k, v in self.per_skill.items()}, "expert_load": [round(float(x), 4) for x in self.expert_load],
            "balance": round(self.balance, 4), "lm_loss": round(self.lm_loss, 4), "lm_tokens": self.lm_tokens,
        }


def _groups(model, tax: Taxonomy) -> torch.Tensor:
    """(num_skills, E) bool from the model's config, checked against the taxonomy's skill ids."""
    names = list(model.config.skill_groups or {})
    if names != tax.names:
        raise ValueError(f"the model's config.skill_groups skills {names} are not the taxonomy's {tax.names} in id order; "
                         "build the config with Taxonomy.config_kwargs(num_experts)")
    return skill_group_matrix(model.config.skill_groups, model.config.num_experts)


def batch_to(batch: dict, device) -> dict:
    """The batch with its tensors moved to `device`."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_routing(model, dataset, collator, taxonomy: Taxonomy, *, batch_size: int = 8) -> RoutingMetrics:
    """Routing accuracy (coarse / fine, per layer and per skill), per-skill usage, balance and LM loss."""
    tax = taxonomy
    groups = _groups(model, tax)
    coarse_of = torch.tensor([tax.id(tax.root_of(n)) for n in tax.names])
    is_fine = torch.tensor([tax.parent(n) is not None for n in tax.names])
    S, E = len(tax), model.config.num_experts
    was_training = model.training
    model.eval()
    hits_c = hits_f = n_c = n_f = 0
    layer_hits: dict[int, list[int]] = {}
    skill_hits, skill_n = np.zeros(S), np.zeros(S)
    usage = np.zeros((S, E))
    load, balance, n_batches = np.zeros(E), 0.0, 0
    lm_sum, lm_tokens = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = next(model.parameters()).device
    for batch in loader:
        batch = batch_to(batch, device)
        skills = batch.pop("skill_labels")
        out = model(**batch, output_routing_trace=True)
        n_lab = int((batch["labels"][:, 1:] != IGNORE).sum())
        if out.lm_loss is not None and n_lab:
            lm_sum += float(out.lm_loss) * n_lab
            lm_tokens += n_lab
        load += out.router_stats["expert_load"].mean(0).cpu().numpy()
        balance += float(out.router_stats["balance"].mean())
        n_batches += 1
        experts = out.routing_trace.experts.cpu()  # (L, B, T, k), k sorted by weight: [..., 0] is top-1
        lab = skills.cpu()
        valid = lab != IGNORE
        if not valid.any():
            continue
        s = lab[valid]  # (V,)
        for li, layer in enumerate(out.routing_trace.layers):
            chosen = experts[li][valid]  # (V, k)
            top1 = chosen[:, 0]
            in_coarse = groups[coarse_of[s], top1]
            in_fine = groups[s, top1]
            fine = is_fine[s]
            hits_c += int(in_coarse.sum())
            n_c += len(s)
            hits_f += int(in_fine[fine].sum())
            n_f += int(fine.sum())
            lh = layer_hits.setdefault(int(layer), [0, 0, 0, 0])
            lh[0] += int(in_coarse.sum())
            lh[1] += len(s)
            lh[2] += int(in_fine[fine].sum())
            lh[3] += int(fine.sum())
            np.add.at(skill_hits, s.numpy(), in_fine.numpy().astype(float))
            np.add.at(skill_n, s.numpy(), 1.0)
            np.add.at(usage, (s[:, None].expand_as(chosen).reshape(-1).numpy(), chosen.reshape(-1).numpy()), 1.0)
    model.train(was_training)
    rows = usage.sum(1, keepdims=True)
    return RoutingMetrics(
        coarse_accuracy=hits_c / max(n_c, 1), fine_accuracy=hits_f / max(n_f, 1), coarse_tokens=n_c, fine_tokens=n_f,
        per_layer={k: {"coarse": round(v[0] / max(v[1], 1), 4), "fine": round(v[2] / max(v[3], 1), 4)} for k, v in sorted(layer_hits.items())},
        per_skill={tax.names[i]: float(skill_hits[i] / skill_n[i]) for i in range(S) if skill_n[i]},
        usage=np.divide(usage, rows, out=np.zeros_like(usage), where=rows > 0),
        expert_load=load / max(n_batches, 1), balance=balance / max(n_batches, 1),
        lm_loss=lm_sum / max(lm_tokens, 1) if lm_tokens else float("nan"), lm_tokens=lm_tokens,
    )


def usage_heatmap(metrics: RoutingMetrics, taxonomy: Taxonomy, skill_groups: dict, path, title: str | None = None):
    """PNG: skills (rows, those with tokens) x experts, cell = share of the skill's choices; its group outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from common.atomic import save_figure

    tax = taxonomy
    rows = [i for i in range(len(tax)) if metrics.usage[i].sum() > 0]
    data = metrics.usage[rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * data.shape[1], 0.9 + 0.33 * len(rows)))
    im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0, vmax=1)
    names = [tax.names[i] for i in rows]
    ax.set_yticks(range(len(rows)), [("· " * tax.depth(n)) + n for n in names])
    ax.set_xticks(range(data.shape[1]), [str(e) for e in range(data.shape[1])])
    ax.set_xlabel("expert")
    for r, n in enumerate(names):
        for e in skill_groups[n]:
            ax.add_patch(Rectangle((e - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.2))
    fig.colorbar(im, ax=ax, label="share of the skill's choices")
    ax.set_title(title or f"expert usage per skill (coarse acc {metrics.coarse_accuracy:.2f}, fine {metrics.fine_accuracy:.2f})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def token_identity_router(token_ids, skill_ids, groups: np.ndarray, vocab_size: int) -> np.ndarray:
    """The best router that sees only the token's identity: for each token id, the expert whose group holds the
    most of that id's labelled training tokens (ties: the lowest expert index); ids never seen get the expert that
    is best over all training tokens. `skill_ids` are the skills the router is scored against (e.g. the coarse
    skill of each token); `groups` (num_skills, E) bool. Returns (vocab_size,) expert per token id."""
    token_ids, skill_ids = np.asarray(token_ids, np.int64), np.asarray(skill_ids, np.int64)
    hits = np.zeros((vocab_size, groups.shape[1]))
    np.add.at(hits, token_ids, groups[skill_ids].astype(float))  # hits[v, e] = #tokens of id v that expert e serves
    route = hits.argmax(1)  # argmax returns the first maximum: the lowest expert index on ties
    route[hits.sum(1) == 0] = int(hits.sum(0).argmax())
    return route


def token_identity_accuracy(train: tuple, heldout: tuple, taxonomy: Taxonomy, skill_groups: dict, num_experts: int,
                            vocab_size: int) -> dict:
    """Routing accuracy of `token_identity_router`, in `evaluate_routing`'s terms (the routed expert lies in the group
    of the token's coarse skill / of its fine skill), fitted on `train` and scored on `heldout`; each is a pair of
    flat arrays (token ids, skill ids) of the labelled tokens. The reference a learned router has to beat: it shows
    how much of the routing accuracy the token's identity alone explains."""
    tax = taxonomy
    groups = skill_group_matrix(skill_groups, num_experts).numpy()
    coarse_of = np.array([tax.id(tax.root_of(n)) for n in tax.names])
    is_fine = np.array([tax.parent(n) is not None for n in tax.names])
    (tr_tok, tr_sk), (ho_tok, ho_sk) = (tuple(np.asarray(a, np.int64) for a in pair) for pair in (train, heldout))
    coarse_route = token_identity_router(tr_tok, coarse_of[tr_sk], groups, vocab_size)
    fine_tr = is_fine[tr_sk]
    fine_route = token_identity_router(tr_tok[fine_tr], tr_sk[fine_tr], groups, vocab_size)
    fine_ho = is_fine[ho_sk]
    coarse_hits = groups[coarse_of[ho_sk], coarse_route[ho_tok]]
    fine_hits = groups[ho_sk[fine_ho], fine_route[ho_tok[fine_ho]]]
    return {"coarse_accuracy": round(float(coarse_hits.mean()) if len(coarse_hits) else float("nan"), 4),
            "fine_accuracy": round(float(fine_hits.mean()) if len(fine_hits) else float("nan"), 4),
            "coarse_tokens": int(len(coarse_hits)), "fine_tokens": int(len(fine_hits)), "train_tokens": int(len(tr_tok))}


def labelled_tokens(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, skill ids) of every skill-labelled token of a tokenised skill dataset (mose/skill_data.py)."""
    toks, skills = [], []
    for ids, lab in zip(dataset["input_ids"], dataset["skill_labels"]):
        ids, lab = np.asarray(ids, np.int64), np.asarray(lab, np.int64)
        keep = lab != IGNORE
        toks.append(ids[keep])
        skills.append(lab[keep])
    return (np.concatenate(toks) if toks else np.zeros(0, np.int64)), (np.concatenate(skills) if skills else np.zeros(0, np.int64))


__all__ = ["RoutingMetrics", "evaluate_routing", "usage_heatmap", "batch_to", "token_identity_router", "token_identity_accuracy",
           "labelled_tokens"]
