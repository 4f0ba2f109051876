"""Baseline selectors: random, coreset (k-center greedy on scene features), uncertainty (from scores)."""
from __future__ import annotations

import math

import numpy as np

from curation.features import resolve_features
from curation.kcenter import kcenter_greedy
from curation.scores import UNCERTAINTY_QUANTITIES, align_scores
from curation.selection import Selection, SelectionError, Selector, check_budget, pool_info


class RandomSelector(Selector):
    """Uniformly random scenes (the reference for BRMR). Score = the uniform draw that ordered the scene."""

    method = "random"
    needs = frozenset()  # the SelectionContext inputs it uses (curation/context.py)

    def __init__(self, random_state: int = 0):
        self.random_state = random_state

    def _select(self, pool, budget: int, ctx) -> Selection:
        n = check_budget(budget, len(pool))
        rng = np.random.default_rng(self.random_state)
        keys = rng.random(len(pool))
        take = np.argsort(keys, kind="stable")[:n]
        ids = pool.ids
        return Selection(
            ids=[ids[i] for i in take], scores=keys[take].tolist(),
            reasons=[f"random draw {keys[i]:.4f} (seed {self.random_state})" for i in take],
            method=self.method, budget=n, seed=self.random_state, config=self.get_params(), pool=pool_info(pool),
        )


class CoresetSelector(Selector):
    """k-center greedy (Sener & Savarese 2018) on standardised scene features.

    `features`: a kind from `curation.features.FEATURE_KINDS` ("scene": metadata one-hot + ego dynamics +
    agent/map summaries), a pool column of feature vectors (e.g. image embeddings), or an array passed to
    `select(..., features=X)`. `algorithm`: "exact", "partitioned" (a named approximation for large pools,
    see curation/kcenter.py) or "auto". Score = the scene's distance to the centres chosen before it.
    """

    method = "coreset"
    needs = frozenset({"features", "initial_ids"})  # the SelectionContext inputs it uses (curation/context.py)

    def __init__(self, features: str = "scene", algorithm: str = "auto", standardize: bool = True, cell_centres: int = 8,
                 neighbours: int = 16, progress: bool = False, random_state: int = 0):
        self.features = features
        self.algorithm = algorithm
        self.standardize = standardize
        self.cell_centres = cell_centres
        self.neighbours = neighbours
        self.progress = progress
        self.random_state = random_state

    def get_params(self) -> dict:
        return {"features": self.features if isinstance(self.features, str) else "array", "algorithm": self.algorithm,
                "standardize": self.standardize, "cell_centres": self.cell_centres, "neighbours": self.neighbours,
                "random_state": self.random_state}

    def _select(self, pool, budget: int, ctx) -> Selection:
        features, initial_ids = ctx.features, ctx.initial_ids
        initial_ids = list(initial_ids or [])
        n = check_budget(budget, len(pool) - len(set(initial_ids)), "pool (minus already-selected scenes)")
        X, names, desc = resolve_features(pool, self.features if features is None else features, self.standardize)
        ids = pool.ids
        pos = {sid: i for i, sid in enumerate(ids)}
        missing = [i for i in initial_ids if i not in pos]
        if missing:
            raise SelectionError(f"coreset: {len(missing)} already-selected id(s) are not in the pool, e.g. {missing[:5]}")
        res = kcenter_greedy(X, n, initial=[pos[i] for i in initial_ids], method=self.algorithm,
                             cell_centres=self.cell_centres, neighbours=self.neighbours, random_state=self.random_state,
                             progress=self.progress)
        order, gain = res["order"], res["gain"]
        reasons = [("random first centre" if not math.isfinite(g) else f"farthest scene: {g:.4g} from the {r + len(initial_ids)} chosen before")
                   for r, g in enumerate(gain)]
        fallbacks = []
        if res["method"] == "partitioned":
            fallbacks.append({"what": "kcenter_approximation", "why": f"N*k = {len(pool)}*{n} exceeds the exact-greedy work limit",
                              "consequence": "neighbourhood-local greedy: covering radius is an upper bound, larger than exact greedy's"})
        return Selection(
            ids=[ids[i] for i in order], scores=[float(g) for g in gain], reasons=reasons, method=self.method,
            budget=n, seed=self.random_state, config=self.get_params(), pool=pool_info(pool), fallbacks=fallbacks,
            state={"features": desc, "num_features": len(names), "kcenter_method": res["method"], "n_cells": res["n_cells"],
                   "covering_radius" if res["method"] == "exact" else "covering_radius_upper_bound": res["radius_upper_bound"],
                   "initial": len(initial_ids)},
        )


class UncertaintySelector(Selector):
    """The `budget` scenes with the highest uncertainty score (from a scores file, mapping or array).

    Ties keep pool order. A scores file naming a quantity other than `UNCERTAINTY_QUANTITIES` (e.g. a NAVSIM
    EPDMS CSV) is refused (curation/scores.py); an unnamed one is taken as uncertainty. `missing`: "error" (default) or "last" (scenes without a score are ranked after
    all scored ones, in pool order; recorded as a fallback).
    """

    method = "uncertainty"
    needs = frozenset({"scores"})  # the SelectionContext inputs it uses (curation/context.py)

    def __init__(self, column: str = "score", missing: str = "error", random_state: int = 0):
        self.column = column
        self.missing = missing
        self.random_state = random_state

    def _select(self, pool, budget: int, ctx) -> Selection:
        scores = ctx.scores
        n = check_budget(budget, len(pool))
        if scores is None:
            raise SelectionError("uncertainty: needs per-scene scores (--scores FILE with 'id' and a score column)")
        if self.missing not in ("error", "last"):
            raise SelectionError(f"uncertainty: missing must be 'error' or 'last', got {self.missing!r}")
        ids = pool.ids
        u, n_missing = align_scores(scores, ids, self.column, missing="error" if self.missing == "error" else "nan",
                                    accept=UNCERTAINTY_QUANTITIES, consumer="uncertainty")
        key = np.where(np.isfinite(u), -u, np.inf)
        take = np.argsort(key, kind="stable")[:n]
        fallbacks = []
        if n_missing:
            fallbacks.append({"what": "missing_scores", "why": f"{n_missing} scenes have no score",
                              "consequence": "ranked after all scored scenes"})
        return Selection(
            ids=[ids[i] for i in take], scores=u[take].tolist(),
            reasons=[f"uncertainty {u[i]:.4g} (rank {r + 1})" if np.isfinite(u[i]) else "no score (filled last)" for r, i in enumerate(take)],
            method=self.method, budget=n, seed=self.random_state, config=self.get_params(), pool=pool_info(pool),
            fallbacks=fallbacks, state={"scores_min": float(np.nanmin(u)) if np.isfinite(u).any() else None,
                                        "scores_max": float(np.nanmax(u)) if np.isfinite(u).any() else None},
        )
