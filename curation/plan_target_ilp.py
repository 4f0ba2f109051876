"""Soft skill targets met as far as the pool allows: a stage's selection as a small integer program
(curation/plan.py, step 6 of its module docstring), solved with `scipy.optimize.milp` (HiGHS).

Scenes with the same source and the same skills among the stage's minimums and targets are interchangeable for
every constraint, so the program counts scenes per such group g (size n_g) instead of one binary per scene:
    z_g in {0..n_g} scenes taken from g;  y_s in [0, T_s] per soft target s (T_s = ceil(fraction * budget));
    k_g in [0, c_g] scenes of the greedy selection kept in g (c_g of them are in g)
    maximise   W * sum_s y_s + sum_g k_g                      (W = budget + 1 > any sum of k_g)
    subject to sum_g z_g = budget;  sum_{g of source q} z_g = quota_q (fixed ratio);
               sum_{g has m} z_g >= min_m (hard minimums);  y_s <= sum_{g has s} z_g;  k_g <= z_g.
So sum_s y_s = sum_s min(T_s, covered_s), the target units met, first; then as many scenes of the greedy
selection (the method's picks after the swap repair) as possible. Within a group the greedy's best-ranked
scenes are kept and new ones drawn in a seeded random order. The greedy selection is a feasible point, so the
solution never meets fewer units; when the greedy meets every reachable unit it is returned unchanged.

"Reachable" for one target s = the optimum of the same program with only that target (the most of its T_s
units any selection within the budget, quotas and minimums meets); "jointly reachable" = the optimum of the
full program.
"""
from __future__ import annotations

import numpy as np

TIME_LIMIT_S = 20.0  # per solve; on a time-out or solver failure the caller keeps the greedy selection (a recorded fallback)


def solve(skills: list[frozenset], sources: np.ndarray, budget: int, quotas: dict[str, int] | None, smin: dict[str, int],
          targets: dict[str, int], chosen: list[int] | None = None, rng=None,
          time_limit: float = TIME_LIMIT_S) -> tuple[list[int] | None, str]:
    """Solve the program above; returns (positions, best first: the kept greedy scenes in their order, then the
    new ones; "optimal") or (None, why it failed)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    chosen = list(chosen or [])
    rel = set(smin) | set(targets)
    groups: dict[tuple, list[int]] = {}
    for i, sk in enumerate(skills):
        groups.setdefault((str(sources[i]), tuple(sorted(sk & rel))), []).append(i)
    keys = sorted(groups)
    G, tk = len(keys), sorted(targets)
    rank = {i: r for r, i in enumerate(chosen)}
    c = [sum(i in rank for i in groups[g]) for g in keys]
    nv = 2 * G + len(tk)  # z_g, k_g, y_s
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(idx, coef, lower, upper):
        r = len(lo)
        rows.extend([r] * len(idx))
        cols.extend(idx)
        vals.extend(coef)
        lo.append(lower)
        hi.append(upper)

    add(list(range(G)), [1.0] * G, budget, budget)
    for src, q in sorted((quotas or {}).items()):
        idx = [j for j, g in enumerate(keys) if g[0] == src]
        add(idx, [1.0] * len(idx), q, q)
    for s, m in sorted(smin.items()):
        idx = [j for j, g in enumerate(keys) if s in g[1]]
        add(idx, [1.0] * len(idx), m, np.inf)
    for t, s in enumerate(tk):
        idx = [j for j, g in enumerate(keys) if s in g[1]]
        add(idx + [2 * G + t], [-1.0] * len(idx) + [1.0], -np.inf, 0.0)
    for j in range(G):
        add([G + j, j], [1.0, -1.0], -np.inf, 0.0)
    A = coo_matrix((vals, (rows, cols)), shape=(len(lo), nv)).tocsr()
    cost = -np.concatenate([np.zeros(G), np.ones(G), np.full(len(tk), float(budget + 1))])
    ub = np.concatenate([[float(len(groups[g])) for g in keys], [float(x) for x in c], [float(targets[s]) for s in tk]])
    integrality = np.concatenate([np.ones(G), np.zeros(G + len(tk))])
    try:
        res = milp(cost, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(np.zeros(nv), ub),
                   options={"time_limit": float(time_limit), "mip_rel_gap": 0.0})
    except (ValueError, MemoryError) as exc:  # pragma: no cover - solver input problems
        return None, f"scipy milp raised {type(exc).__name__}: {exc}"
    if res.status != 0 or res.x is None:
        return None, f"scipy milp status {res.status}: {res.message}"
    z = np.rint(res.x[:G]).astype(int)
    tie = (rng if rng is not None else np.random.default_rng(0)).random(len(skills))
    kept, new = [], []
    for j, g in enumerate(keys):
        mine = sorted((i for i in groups[g] if i in rank), key=rank.__getitem__)  # greedy scenes, best first
        kept += mine[:z[j]]
        others = sorted((i for i in groups[g] if i not in rank), key=lambda i: (tie[i], i))
        new += others[:max(0, z[j] - len(mine))]
    out = sorted(kept, key=rank.__getitem__) + sorted(new)
    # check the rounded solution exactly (never trust the float objective)
    ok = len(out) == len(set(out)) == budget and all(sum(sources[i] == src for i in out) == q for src, q in (quotas or {}).items()) \
        and all(sum(s in skills[i] for i in out) >= m for s, m in smin.items())
    return (out, "optimal") if ok else (None, "scipy milp returned a solution that breaks the budget, quotas or minimums")


def units(chosen, skills: list[frozenset], targets: dict[str, int]) -> dict[str, int]:
    """Per target: min(T_s, scenes of `chosen` with skill s)."""
    return {s: min(t, sum(s in skills[i] for i in chosen)) for s, t in targets.items()}
