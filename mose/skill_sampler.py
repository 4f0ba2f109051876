"""A sampler that draws skill-dataset items so that the labelled-token share per skill hits a target.

Each item i has a distribution p_i over skills (its labelled tokens per skill, or, with unit="items", its
skills present, equally weighted). Drawing item i with probability w_i gives an expected share
a = sum_i w_i p_i. The weights minimise KL(target || a) over the simplex, found by the EM fixed point for
mixture weights, w_i <- w_i * sum_s p_is * target_s / a_s, which keeps every item reachable (w_i > 0) and
converges to the target whenever the target lies in the convex hull of the items' distributions.
(Our design; the MoSE paper does not say how skills are balanced.)

Levels: "coarse" counts a token for its root skill; "fine" counts only tokens labelled with a leaf skill.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from mose.skills import Taxonomy


def item_skill_matrix(skill_counts: Sequence[Sequence[int]], taxonomy: Taxonomy, level: str = "coarse") -> tuple[np.ndarray, list[str]]:
    """(N, S) labelled tokens per item and skill at `level`, and the S skill names (columns)."""
    counts = np.asarray(skill_counts, dtype=np.float64).reshape(len(skill_counts), len(taxonomy))
    if level == "coarse":
        names = taxonomy.roots
        cols = np.stack([counts[:, [taxonomy.id(n) for n in taxonomy.names if taxonomy.root_of(n) == r]].sum(1) for r in names], 1)
    elif level == "fine":
        names = taxonomy.leaves
        cols = counts[:, [taxonomy.id(n) for n in names]]
    else:
        raise ValueError(f"level must be 'coarse' or 'fine', got {level!r}")
    return cols, names


class SkillBalancedSampler(Sampler[int]):
    """Draws `num_samples` indices per epoch with replacement, skill-balanced (see the module doc).

    Parameters: `skill_counts` the dataset's ``skill_counts`` column (or the dataset itself); `target` skill ->
    weight at `level` (default uniform over the skills present); `unit` "tokens" or "items"; `random_state`.
    Fitted state: `weights_` (N,), `target_` and `expected_` (skill -> share), `kl_` = KL(target || expected).
    """

    def __init__(self, skill_counts, taxonomy: Taxonomy, target: Mapping[str, float] | None = None, *,
                 level: str = "coarse", unit: str = "tokens", num_samples: int | None = None, max_iter: int = 2000,
                 tol: float = 1e-10, random_state: int = 0):
        if hasattr(skill_counts, "column_names"):
            skill_counts = skill_counts["skill_counts"]
        self.taxonomy = taxonomy
        self.level, self.unit, self.random_state = level, unit, random_state
        if unit not in ("tokens", "items"):
            raise ValueError(f"unit must be 'tokens' or 'items', got {unit!r}")
        counts, names = item_skill_matrix(skill_counts, self.taxonomy, level)
        if unit == "items":
            counts = (counts > 0).astype(np.float64)
        totals = counts.sum(1, keepdims=True)
        P = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)  # (N, S) rows sum to 1 or 0
        present = P.sum(0) > 0
        if target is None:
            t = present.astype(np.float64)
        else:
            unknown = [k for k in target if k not in names]
            if unknown:
                raise ValueError(f"target skill(s) {unknown} are not {level} skills; expected some of {names}")
            t = np.array([float(target.get(n, 0.0)) for n in names])
            if (t < 0).any() or t.sum() <= 0:
                raise ValueError(f"target weights must be non-negative with a positive sum, got {dict(target)}")
            missing = [n for n, ti, p in zip(names, t, present) if ti > 0 and not p]
            if missing:
                raise ValueError(f"target asks for {missing} but no item has tokens of those skills")
        t = t / t.sum()
        usable = totals[:, 0] > 0
        if not usable.any():
            raise ValueError("no item has labelled tokens at this level; nothing to balance")
        w = usable / usable.sum()
        for _ in range(max_iter):
            a = w @ P
            ratio = np.divide(t, a, out=np.zeros_like(t), where=a > 0)
            w_new = w * (P @ ratio)
            w_new /= w_new.sum()
            if np.abs(w_new - w).max() < tol:
                w = w_new
                break
            w = w_new
        a = w @ P
        self.weights_ = w
        self.skills_ = names
        self.target_ = dict(zip(names, t.tolist()))
        self.expected_ = dict(zip(names, a.tolist()))
        self.kl_ = float(np.sum(np.where(t > 0, t * np.log(np.maximum(t, 1e-300) / np.maximum(a, 1e-300)), 0.0)))
        self.num_samples = int(num_samples or len(w))
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(int(self.random_state) * 1_000_003 + self._epoch)
        self._epoch += 1
        idx = torch.multinomial(torch.as_tensor(self.weights_, dtype=torch.float64), self.num_samples, replacement=True, generator=g)
        return iter(idx.tolist())

    def __len__(self) -> int:
        return self.num_samples
