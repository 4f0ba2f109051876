"""Pieces of benchmarks/data_efficiency.py: the fixed held-out splits, a caching fast pilot, and one runner per
selection method. Every choice here that the papers leave open is marked OURS.

Splits (OURS): the test set T and the validation set V are whole logs (episodes) of `source` scenes (default
"real": synthetic scenes are training candidates only, the deployment domain is the real one), drawn
round-robin over environments (`location`) so both cover every environment; T is fixed by `split_seed`
alone (never by a method seed). The training pool is every scene of the other logs, both sources. Methods
that need model feedback (MOSAIC's pilots and importance, AutoScale's Cluster-GA, the base model of
uncertainty and semantic scoring) see only V; T is used once per (method, seed, budget) for the final score.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from eval.pilot import FastPilot

NESTED = ("random", "coreset", "uncertainty", "semantic")  # selection at budget b = the first b of the largest budget's
PER_BUDGET = ("mosaic", "sead", "autoscale")


# ----------------------------------------------------------------------------------------------
# splits


def log_names(pool) -> list[str]:
    return [str(json.loads(m).get("log_name", sid)) for sid, m in zip(pool.ids, pool.column("meta"))]


def make_splits(pool, test_size: int, val_size: int, source: str = "real", split_seed: int = 0) -> dict:
    """{"test", "val", "train"} id lists (whole logs; T and V from `source` logs, at least the requested size) and "info"."""
    ids, logs = pool.ids, log_names(pool)
    srcs, locs = pool.column("source"), pool.column("location")
    members: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(logs):
        members[name].append(i)
    by_env: dict[str, list[str]] = defaultdict(list)
    for name in sorted(members):
        m = members[name]
        if source == "all" or all(srcs[i] == source for i in m):
            by_env[str(locs[m[0]])].append(name)
    rng = np.random.default_rng(split_seed)
    queues = {env: list(rng.permutation(v)) for env, v in sorted(by_env.items())}
    order = []  # round-robin over environments, each in a seeded random order
    while any(queues.values()):
        for env in sorted(queues):
            if queues[env]:
                order.append(queues[env].pop(0))
    picked: dict[str, list[str]] = {"test": [], "val": []}
    n = {"test": 0, "val": 0}
    for name in order:
        part = "test" if n["test"] < test_size else "val" if n["val"] < val_size else None
        if part is None:
            break
        picked[part].append(name)
        n[part] += len(members[name])
    if n["test"] < test_size or n["val"] < val_size:
        raise ValueError(f"make_splits: the pool has too few {source!r} logs for {test_size} test + {val_size} validation scenes "
                         f"(got {n['test']} + {n['val']}); generate a larger pool or lower --test-size/--val-size")
    held = set(picked["test"]) | set(picked["val"])
    out = {part: [ids[i] for name in picked[part] for i in members[name]] for part in ("test", "val")}
    out["train"] = [ids[i] for i, name in enumerate(logs) if name not in held]
    if not out["train"]:
        raise ValueError("make_splits: no training scenes left after the held-out logs")
    pos = {s: i for i, s in enumerate(ids)}
    out["info"] = {part: {"scenes": len(out[part]), "logs": len({logs[pos[s]] for s in out[part]}),
                          "sources": _count(srcs[pos[s]] for s in out[part]),
                          "environments": _count(locs[pos[s]] for s in out[part])} for part in ("test", "val", "train")}
    return out


def _count(values) -> dict:
    d: dict = defaultdict(int)
    for v in values:
        d[str(v)] += 1
    return dict(sorted(d.items()))


def digest(ids: Sequence[str], ordered: bool = False) -> str:
    h = hashlib.sha256()
    for s in (ids if ordered else sorted(ids)):
        h.update(str(s).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
# ----------------------------------------------------------------------------------------------
# the pilot


class BenchPilot(FastPilot):
    """`eval.pilot.FastPilot` with two caches (OURS, results unchanged):
    - a persistent `eval.navsim.scorer.ReferenceCache` (PDM-Closed reference and human sub-metrics of a scene are
      computed once and reused: NAVSIM's metric cache), shareable between pilots on the same pool;
    - memoised fits: the same training set (as a set: ridge is order-free) returns the stored metrics and
      restores the fitted estimator, so MOSAIC's `score_samples` after a repeated base run sees the right model.
    """

    def __init__(self, pool, eval_ids, *, reference_cache=None, **kw):
        from eval.navsim.scorer import ReferenceCache

        super().__init__(pool, eval_ids, **kw)
        self.reference_cache = ReferenceCache() if reference_cache is None else reference_cache
        self._fits: dict[str, tuple] = {}
        self._samples: dict[tuple, np.ndarray] = {}
        self._model_key = None
        self.runs_ = self.memo_hits_ = 0

    def _key(self, ids) -> str:
        return digest(ids, ordered=self.model != "ridge")

    def score_rows(self, ids):
        from eval.navsim.scorer import score_scenes

        preds = self.predict(ids)
        return score_scenes([self._scene(s) for s in ids], preds, metric=self.metric, tracking=self.tracking,
                            human_filter=self.human_filter, num_poses=self.num_poses, interval=self.interval,
                            reference_cache=self.reference_cache, progress=False)

    def fit_and_score(self, ids):
        key = self._key(ids)
        if key in self._fits:
            out, est, n_train, n_skipped = self._fits[key]
            self.estimator_, self.n_train_, self.n_skipped_, self._model_key = est, n_train, n_skipped, key
            self.memo_hits_ += 1
            return dict(out)
        out = super().fit_and_score(ids)
        self._fits[key] = (dict(out), self.estimator_, self.n_train_, self.n_skipped_)
        self._model_key = key
        self.runs_ += 1
        return out

    def fit(self, ids):
        self._model_key = None
        return super().fit(ids)

    def rollout_score(self) -> float:
        """Mean EPDMS on the evaluation set of the untrained constant-speed/yaw-rate rollout (the zero-residual model)."""
        from eval.navsim.scorer import mean_score, score_scenes
        from eval.pilot import constant_rollout

        scenes = [self._scene(s) for s in self.eval_ids]
        preds = {s.id: constant_rollout(s, self.num_poses, self.interval) for s in scenes}
        return float(mean_score(score_scenes(scenes, preds, metric=self.metric, tracking=self.tracking, human_filter=self.human_filter,
                                             num_poses=self.num_poses, interval=self.interval,
                                             reference_cache=self.reference_cache, progress=False)))

    def score_samples(self, ids):
        key = (self._model_key, digest(ids, ordered=True))
        if self._model_key is None or key not in self._samples:
            val = super().score_samples(ids)
            if self._model_key is None:
                return val
            self._samples[key] = val
        return self._samples[key].copy()


# ----------------------------------------------------------------------------------------------
# base model for uncertainty and semantic scoring


def base_set(cand: Sequence[str], seed: int) -> list[str]:
    """A seeded random labelled base set: 5 % of the candidates, clipped to [8, 64] (MOSAIC's base-run rule)."""
    n = int(min(np.clip(round(0.05 * len(cand)), 8, 64), len(cand) - 1))
    rng = np.random.default_rng(10_000 + seed)
    return [cand[i] for i in rng.choice(len(cand), n, replace=False)]


def ensemble_uncertainty(pilot: BenchPilot, base: Sequence[str], cand: Sequence[str], members: int, seed: int) -> np.ndarray:
    """OURS: bootstrap-ensemble disagreement. `members` pilots fitted on bootstrap resamples of `base`; a candidate's
    uncertainty = mean over the planned poses of the variance (x plus y, m^2) of the members' positions."""
    rng = np.random.default_rng(20_000 + seed)
    preds = []
    for _ in range(members):
        boot = [base[i] for i in rng.integers(0, len(base), len(base))]
        pilot.fit(boot)
        p = pilot.predict(list(cand))
        preds.append(np.stack([p[s][:, :2] for s in cand]))
    P = np.stack(preds)  # (M, N, K, 2)
    return P.var(axis=0, ddof=1).sum(-1).mean(-1)


# ----------------------------------------------------------------------------------------------
# one selection


class Context:
    """What every method runner gets: the pool, the candidates (training pool), the held-out ids to exclude,
    the validation pilot (model feedback) and the benchmark's per-method configuration."""

    def __init__(self, pool, splits: dict, val_pilot: BenchPilot, config: dict, progress: bool = True):
        self.pool, self.splits, self.val_pilot, self.config, self.progress = pool, splits, val_pilot, config, progress
        self.cand = list(splits["train"])
        self.exclude = list(splits["test"]) + list(splits["val"])
        self._sub = None
        self._embeddings: dict[int, tuple] = {}
        self.plot_dir, self.plot_at, self.method = None, None, None  # plots of one (seed, budget) per method, if set

    def plots_for(self, seed: int, budget: int):
        """OUT/plots/<method> for the (seed, budget) chosen for plots, else None."""
        return str(self.plot_dir / self.method) if self.plot_dir is not None and (seed, budget) == self.plot_at else None

    @property
    def subpool(self):
        """The candidates as a pool of their own (for selectors without an `exclude` argument)."""
        if self._sub is None:
            self._sub = self.pool.select_ids(self.cand)
        return self._sub


def select(method: str, ctx: Context, budget: int, seed: int) -> tuple[list[str], dict]:
    """(selected ids in selection order, a JSON-friendly summary of what the method fitted). A variant name
    "<method>_<tag>" (e.g. "mosaic_kmeans4") runs <method> with the config section of that name. The method's
    selector and its inputs come from the method registry (curation/registry.py); a runner below only prepares
    the benchmark's inputs (base sets, ensembles, feedback on the validation set)."""
    ctx.method = method
    return RUNNERS[method if method in RUNNERS else method.split("_")[0]](ctx, budget, seed, dict(ctx.config.get(method, {})))


def _selector(name: str, ctx: Context, seed: int, params: dict, **defaults):
    """The registry's selector `name` with the benchmark's parameters; the seed is always the run's seed."""
    from curation.registry import method

    return method(name).build(params, defaults={"progress": ctx.progress, **defaults}, overrides={"random_state": seed},
                              where=f"benchmark config: {ctx.method}")


def _select(name: str, selector, pool, budget: int, **inputs):
    """`selector.select` with the method's SelectionContext (an input the method does not use raises)."""
    from curation.registry import method

    return selector.select(pool, budget, method(name).context(**inputs))


def _random(ctx, budget, seed, cfg):
    sel = _select("random", _selector("random", ctx, seed, {}), ctx.subpool, budget)
    return sel.ids, {}


def _coreset(ctx, budget, seed, cfg):
    sel = _select("coreset", _selector("coreset", ctx, seed, cfg), ctx.subpool, budget)
    return sel.ids, {"covering_radius": sel.state.get("covering_radius"), "kcenter_method": sel.state.get("kcenter_method")}


def _uncertainty(ctx, budget, seed, cfg):
    base = base_set(ctx.cand, seed)
    u = ensemble_uncertainty(ctx.val_pilot, base, ctx.cand, int(cfg.get("members", 5)), seed)  # members: the benchmark's, not the selector's
    sel = _select("uncertainty", _selector("uncertainty", ctx, seed, {}), ctx.subpool, budget, scores=dict(zip(ctx.cand, u.tolist())))
    return sel.ids, {"base_size": len(base), "uncertainty_quantiles": np.quantile(u, [0.1, 0.5, 0.9]).tolist()}


def _semantic(ctx, budget, seed, cfg):
    base = base_set(ctx.cand, seed)
    ctx.val_pilot.fit(base)
    preds = ctx.val_pilot.predict(ctx.cand)
    sel = _select("semantic", _selector("semantic", ctx, seed, cfg), ctx.subpool, budget, predictions=preds)
    keep = ("pearson_check", "num_train", "num_candidates", "sigma_S", "sigma_R", "sigma_U", "loss_first", "loss_last")
    return sel.ids, {"base_size": len(base), **{k: sel.state.get(k) for k in keep}, "fallbacks": [f["what"] for f in sel.fallbacks]}


def _mosaic(ctx, budget, seed, cfg):
    pool = ctx.pool
    key = cfg.pop("domain_key", None)
    if key and "+" in key:  # OURS: a composite domain such as "location+source" becomes a column of its own
        cols = [pool.column(k) for k in key.split("+")]
        pool = pool.with_column("benchmark_domain", ["/".join(map(str, v)) for v in zip(*cols)])
        key = "benchmark_domain"
    selector = _selector("mosaic", ctx, seed, {"domain_key": key, "plot_dir": ctx.plots_for(seed, budget), **cfg})
    sel = _select("mosaic", selector, pool, budget, pilot=ctx.val_pilot, exclude=ctx.exclude)
    st = sel.state
    return sel.ids, {"domains": st["domains"], "allocation": st["allocation"], "importance": st["importance"],
                     "fits": {d: {k: f[k] for k in ("a", "tau", "r2", "status")} for d, f in st["fits"].items()},
                     "pilot_points": st["pilot"]["points"], "base_score": st["pilot"]["base_score"],
                     "fallbacks": [f["what"] for f in sel.fallbacks]}


def _sead(ctx, budget, seed, cfg):
    # SEAD's choices come from ground-truth agent/map sets (FastPilot has no set_features), so its retraining
    # rounds only record metrics: they are skipped here (no pilot); the chosen scenes are the same.
    sel = _select("sead", _selector("sead", ctx, seed, cfg, final_fit=False), ctx.pool, budget, exclude=ctx.exclude)
    return sel.ids, {"round_budgets": sel.state["round_budgets"], "fallbacks": [f["what"] for f in sel.fallbacks]}


def _autoscale(ctx, budget, seed, cfg):
    from curation.features import ArrayPool

    feedback = cfg.pop("feedback", "pilot")
    episodes = int(cfg.pop("feedback_episodes", 8))
    if feedback == "pilot":  # open-loop EPDMS of the fast pilot on the validation set
        evaluator = ctx.val_pilot
    elif feedback == "closed_loop":  # eval/autoscale_feedback.py: drive the fitted pilot in highway-env
        from eval.autoscale_feedback import ClosedLoopFeedback

        evaluator = ClosedLoopFeedback(ctx.pool, episodes=episodes, seed=10_000, pilot_model=ctx.val_pilot.model,
                                       pilot_alpha=ctx.val_pilot.alpha, random_state=seed)
    else:
        raise ValueError(f"autoscale: feedback must be 'pilot' or 'closed_loop', got {feedback!r}")
    sel = _selector("autoscale", ctx, seed, cfg)
    if seed not in ctx._embeddings:  # Graph-RAE depends on the seed, not on the budget: embed once per seed
        pos = {s: i for i, s in enumerate(ctx.pool.ids)}
        ctx._embeddings[seed] = sel.embed(ctx.pool, np.array([pos[s] for s in ctx.cand], np.int64))
    Z, emb_state = ctx._embeddings[seed]
    src = ctx.subpool.column("source")
    arr = ArrayPool(ctx.cand, {"source": src, "benchmark_embedding": Z.tolist()})
    sel.embedding = "benchmark_embedding"
    out = _select("autoscale", sel, arr, budget, evaluator=evaluator, report_dir=ctx.plots_for(seed, budget))
    st = out.state
    return out.ids, {"feedback": feedback, "embedding": emb_state, "ratio": st["ratio"], "synthetic_fraction": st["synthetic_fraction"],
                     "best_round": st["best_round"], "best_score": st["best_score"], "initial_score": st["initial_score"],
                     "evaluations": st["evaluations"], "stop_reason": st["stop_reason"]}


# the benchmark's input preparation per registered method (curation/registry.py METHODS)
RUNNERS = {"random": _random, "coreset": _coreset, "uncertainty": _uncertainty, "mosaic": _mosaic, "sead": _sead,
           "semantic": _semantic, "autoscale": _autoscale}
