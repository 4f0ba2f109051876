"""Soft skill targets met as far as the pool allows: a stage's selection as a small integer program
(curation/plan.py, step 6 of its module docstring), solved with `scipy.optimize.milp` (HiGHS).

Variables: x_i in {0, 1} per candidate scene, y_s in [0, T_s] per soft target s (T_s = ceil(fraction * budget)).
    maximise   W * sum_s y_s + sum_i w_i x_i
    subject to sum_i x_i = budget;  sum_{i in source q} x_i = quota_q (fixed ratio);
               sum_{i has m} x_i >= min_m (hard minimums);  y_s <= sum_{i has s} x_i.
So sum_s y_s = sum_s min(T_s, covered_s), the number of target units met. The secondary weights w_i keep the
greedy selection (the method's picks after the swap repair): w_i = 1 + a rank bonus below 1/(4 budget) for a
scene of that selection, a seeded random bonus below 1/(4 budget) for any other; W = budget + 1 exceeds any
sum of secondary weights, so the units come first and, among optima, the solution keeps as many of the
greedy selection's scenes as possible (all of them when the greedy already meets every reachable unit).

"Reachable" for one target s = the optimum of the same program with only that target (the most of its T_s
units any selection within the budget, quotas and minimums meets); "jointly reachable" = the optimum of the
full program. The greedy selection is a feasible point of the program, so the solution never meets fewer units.
"""
from __future__ import annotations

import numpy as np

TIME_LIMIT_S = 10.0  # per solve; on a time-out or solver failure the caller keeps the greedy selection (a recorded fallback)


def solve(skills: list[frozenset], sources: np.ndarray, budget: int, quotas: dict[str, int] | None, smin: dict[str, int],
          targets: dict[str, int], weights: np.ndarray | None = None,
          time_limit: float = TIME_LIMIT_S) -> tuple[list[int] | None, str]:
    """Solve the program above; returns (chosen positions sorted, "optimal") or (None, why it failed)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, tk = len(skills), sorted(targets)
    nv = n + len(tk)
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(idx, coef, lower, upper):
        r = len(lo)
        rows.extend([r] * len(idx))
        cols.extend(idx)
        vals.extend(coef)
        lo.append(lower)
        hi.append(upper)

    add(list(range(n)), [1.0] * n, budget, budget)
    for src, q in sorted((quotas or {}).items()):
        idx = [i for i in range(n) if sources[i] == src]
        add(idx, [1.0] * len(idx), q, q)
    for s, m in sorted(smin.items()):
        idx = [i for i in range(n) if s in skills[i]]
        add(idx, [1.0] * len(idx), m, np.inf)
    for k, s in enumerate(tk):
        idx = [i for i in range(n) if s in skills[i]]
        add(idx + [n + k], [-1.0] * len(idx) + [1.0], -np.inf, 0.0)
    A = coo_matrix((vals, (rows, cols)), shape=(len(lo), nv)).tocsr()
    w = np.zeros(n) if weights is None else np.asarray(weights, float)
    big = float(budget + 1)
    c = -np.concatenate([w, np.full(len(tk), big)])
    ub = np.concatenate([np.ones(n), [float(targets[s]) for s in tk]])
    integrality = np.concatenate([np.ones(n), np.zeros(len(tk))])
    try:
        res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(np.zeros(nv), ub),
                   options={"time_limit": float(time_limit), "mip_rel_gap": 0.0})
    except (ValueError, MemoryError) as exc:  # pragma: no cover - solver input problems
        return None, f"scipy milp raised {type(exc).__name__}: {exc}"
    if res.status != 0 or res.x is None:
        return None, f"scipy milp status {res.status}: {res.message}"
    chosen = sorted(int(i) for i in np.flatnonzero(res.x[:n] > 0.5))
    # check the rounded solution exactly (never trust the float objective)
    ok = len(chosen) == budget and all(sum(sources[i] == src for i in chosen) == q for src, q in (quotas or {}).items()) \
        and all(sum(s in skills[i] for i in chosen) >= m for s, m in smin.items())
    return (chosen, "optimal") if ok else (None, "scipy milp returned a solution that breaks the budget, quotas or minimums")


def units(chosen, skills: list[frozenset], targets: dict[str, int]) -> dict[str, int]:
    """Per target: min(T_s, scenes of `chosen` with skill s)."""
    return {s: min(t, sum(s in skills[i] for i in chosen)) for s, t in targets.items()}


def preference(chosen: list[int], n: int, rng) -> np.ndarray:
    """The secondary weights: 1 + rank bonus for the greedy selection (best first), a seeded tie bonus otherwise."""
    b = max(len(chosen), 1)
    w = rng.random(n) / (4.0 * b * (n + 1))
    for r, i in enumerate(chosen):
        w[i] = 1.0 + (b - r) / (4.0 * b * (b + 1))
    return w
