"""AutoScale: a closed-loop real:synthetic data mixture (Graph-RAE clusters -> Cluster-GA -> retrieval).

OUR DESIGN: the AutoScale paper (arXiv:2605.21372; docs/methods/autoscale.md) publishes only its abstract (
Graph-RAE scene representation, Cluster-GA "cluster-aware gradient ascent" on mixture weights driven by
closed-loop feedback, cluster-guided vector retrieval of high-value samples, an automatic real:synthetic
ratio). Every step below is our reading, named and configurable:

1. Embedding: Graph-RAE (curation/scene_graph.py) on the candidate scenes (or a given embedding column).
2. Clusters: k-means (`n_clusters`) on the standardised embeddings of real and synthetic scenes together.
   Mixture components ("cells") are (cluster, source) pairs, so the mixture sets the real:synthetic ratio
   per scene type; empty cells are dropped.
3. Mixture -> scenes: weights w = softmax(theta) over cells; the budget is apportioned by largest remainder,
   capped at each cell's size (overflow goes to the other cells by weight). Each cell is taken in a fixed
   order, so a small change of w changes the set by a few scenes (common random numbers for the gradient):
   real cells in a seeded random order (`real_order="random"`) or nearest-to-centroid first; synthetic cells
   by cluster-guided retrieval (`synthetic_order="retrieval"`): nearest first to the cluster's real scenes
   (faiss exact L2; the cluster centroid when it has no real scene) - synthetic scenes that look like the
   real scenes of the valuable clusters come first, limiting the sim-to-real shift.
4. Cluster-GA: rounds of (evaluate the centre mixture -> per-cell gradient estimate of the closed-loop score
   w.r.t. theta -> theta += step). Estimators (`gradient`):
   - "spsa": simultaneous perturbation, g = mean_s (F(theta + c D_s) - F(theta - c D_s)) / (2c) * D_s,
     D_s in {-1, +1}^cells (2 evaluations per sample, any number of cells);
   - "fd": central finite differences per cell (2 evaluations per cell);
   - "leave_out": F(theta) - F(cell k removed) = v_k; g_k = (1 - w_k) v_k, the softmax chain rule applied to
     the removal direction (1 evaluation per cell).
   Step: theta += eta_r * g / ||g|| (`normalize=True`, scale-free) or eta_r * g; eta_r = step_size /
   (1 + r)^step_decay. Stops after `max_rounds`, after `patience` rounds without the centre score beating the
   best by more than `tol`, or on a zero gradient. Returns the best centre (`return_point="best"`) or the last.
   Identical allocations are evaluated once (cache).
5. Feedback: a `MixtureEvaluator` (`evaluate(ids) -> float | {"score": ...}`) or a `PilotTrainer`
   (`fit_and_score(ids)`); curation never imports eval - the simulator's closed-loop evaluator lives in
   eval/autoscale_feedback.py.
The manifest's state holds every round (score, weights, counts per cell, real:synthetic ratio); with
`report_dir` a PNG shows the weights and ratio per round.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from curation.selection import PilotTrainer, Selection, SelectionError, Selector, check_budget, pool_info, run_pilot


@runtime_checkable
class MixtureEvaluator(Protocol):
    """Trains a model on `ids` and returns its closed-loop score (higher is better), or a dict with "score"."""

    def evaluate(self, ids: Sequence[str]) -> float | dict: ...


def feedback_score(evaluator, ids: Sequence[str]) -> tuple[float, dict]:
    """(score, metrics) from a MixtureEvaluator or a PilotTrainer; raises SelectionError on a non-finite score."""
    if isinstance(evaluator, MixtureEvaluator):
        out = evaluator.evaluate(list(ids))
        metrics = dict(out) if isinstance(out, dict) else {"score": out}
    elif isinstance(evaluator, PilotTrainer):
        metrics = run_pilot(evaluator, ids, "AutoScale feedback run")
    else:
        raise SelectionError(f"autoscale: feedback must have evaluate(ids) or fit_and_score(ids), got {type(evaluator).__name__}")
    score = metrics.get("score")
    if not isinstance(score, (int, float, np.floating)) or not math.isfinite(float(score)):
        raise SelectionError(f"autoscale: feedback returned no finite 'score' for {len(ids)} scenes: {metrics!r}")
    return float(score), metrics


# ----------------------------------------------------------------------------------------------
# budget apportionment and retrieval


def allocate_budget(weights: np.ndarray, capacities: np.ndarray, budget: int) -> np.ndarray:
    """Integer counts summing to `budget`: largest-remainder apportionment of `weights`, capped at `capacities`;
    what a full cell cannot take is re-apportioned among the others by weight."""
    w = np.clip(np.asarray(weights, float), 0.0, None)
    cap = np.asarray(capacities, np.int64)
    if budget > cap.sum():
        raise SelectionError(f"allocate_budget: budget {budget} exceeds the {int(cap.sum())} scenes available")
    counts = np.zeros(len(w), np.int64)
    left = int(budget)
    while left > 0:
        room = cap - counts
        open_ = room > 0
        ww = np.where(open_, w, 0.0)
        if ww.sum() <= 0:  # only zero-weight cells have room: fill them by room
            ww = np.where(open_, room.astype(float), 0.0)
        share = left * ww / ww.sum()
        add = np.minimum(np.floor(share).astype(np.int64), room)
        rest = left - int(add.sum())
        if rest > 0:
            frac = np.where(open_ & (add < room), share - np.floor(share), -1.0)
            for i in np.argsort(-frac, kind="stable")[:rest]:
                if frac[i] >= 0 and add[i] < room[i]:
                    add[i] += 1
        if add.sum() == 0:  # guard: give one scene to the open cell with the largest weight
            add[int(np.argmax(np.where(open_, ww, -1.0)))] += 1
        counts += add
        left = int(budget - counts.sum())
    return counts


def retrieval_order(queries: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ordered by their distance to the nearest query (exact L2 with faiss; numpy fallback).
    Returns (order, distance of each ordered candidate)."""
    q = np.ascontiguousarray(queries, np.float32)
    c = np.ascontiguousarray(candidates, np.float32)
    if len(c) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    try:
        import faiss

        index = faiss.IndexFlatL2(q.shape[1])
        index.add(q)
        d2, _ = index.search(c, 1)
        d2 = d2[:, 0]
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        d2 = ((c[:, None, :] - q[None, :, :]) ** 2).sum(-1).min(1)
    d = np.sqrt(np.maximum(d2.astype(np.float64), 0.0))
    order = np.argsort(d, kind="stable")
    return order, d[order]


def softmax(theta: np.ndarray) -> np.ndarray:
    t = np.asarray(theta, float)
    finite = np.isfinite(t)
    out = np.zeros_like(t)
    if finite.any():
        e = np.exp(t[finite] - t[finite].max())
        out[finite] = e / e.sum()
    return out


# ----------------------------------------------------------------------------------------------
# Cluster-GA


@dataclass
class GAResult:
    best_theta: np.ndarray
    best_score: float
    best_round: int
    final_theta: np.ndarray
    rounds: list[dict] = field(default_factory=list)
    evaluations: int = 0
    stop_reason: str = ""


class ClusterGA:
    """Gradient ascent on mixture logits theta driven by a black-box score F(theta) (see the module doc, step 4)."""

    def __init__(self, step_size: float = 0.5, gradient: str = "spsa", perturbation: float = 0.5, spsa_samples: int = 1,
                 max_rounds: int = 6, patience: int = 3, tol: float = 1e-3, normalize: bool = True, step_decay: float = 0.0,
                 return_point: str = "best", random_state: int = 0, progress: bool = False):
        self.step_size, self.gradient, self.perturbation, self.spsa_samples = step_size, gradient, perturbation, spsa_samples
        self.max_rounds, self.patience, self.tol, self.normalize = max_rounds, patience, tol, normalize
        self.step_decay, self.return_point, self.random_state, self.progress = step_decay, return_point, random_state, progress

    def check(self) -> None:
        if self.gradient not in ("spsa", "fd", "leave_out"):
            raise SelectionError(f"Cluster-GA: gradient must be 'spsa', 'fd' or 'leave_out', got {self.gradient!r}")
        if self.return_point not in ("best", "last"):
            raise SelectionError(f"Cluster-GA: return_point must be 'best' or 'last', got {self.return_point!r}")
        for name in ("step_size", "perturbation"):
            if not getattr(self, name) > 0:
                raise SelectionError(f"Cluster-GA: {name} must be > 0, got {getattr(self, name)!r}")
        if int(self.max_rounds) < 0 or int(self.spsa_samples) < 1 or int(self.patience) < 1:
            raise SelectionError("Cluster-GA: max_rounds >= 0, spsa_samples >= 1 and patience >= 1 expected")

    def estimate(self, F: Callable[[np.ndarray], float], theta: np.ndarray, f0: float, rng) -> np.ndarray:
        c, K = self.perturbation, len(theta)
        g = np.zeros(K)
        if self.gradient == "spsa":
            for _ in range(int(self.spsa_samples)):
                delta = rng.choice([-1.0, 1.0], size=K)
                g += (F(theta + c * delta) - F(theta - c * delta)) / (2 * c) * delta
            return g / int(self.spsa_samples)
        if self.gradient == "fd":
            for k in range(K):
                e = np.zeros(K)
                e[k] = c
                g[k] = (F(theta + e) - F(theta - e)) / (2 * c)
            return g
        w = softmax(theta)
        for k in range(K):  # leave_out
            if K == 1:
                break
            t = theta.copy()
            t[k] = -np.inf
            g[k] = (1.0 - w[k]) * (f0 - F(t))
        return g

    def optimize(self, F: Callable[[np.ndarray], float], theta0: Sequence[float]) -> GAResult:
        """Maximise F over theta, starting at theta0. `F` is called with a copy of theta (may hold -inf)."""
        from tqdm.auto import tqdm

        self.check()
        rng = np.random.default_rng(self.random_state)
        calls = [0]

        def f(t):
            calls[0] += 1
            return float(F(np.array(t, float)))

        theta = np.asarray(theta0, float).copy()
        score = f(theta)
        best = (score, theta.copy(), 0)
        rounds = [{"round": 0, "theta": theta.tolist(), "weights": softmax(theta).tolist(), "score": score, "gradient": None,
                   "step": 0.0, "evaluations": calls[0]}]
        since, reason = 0, f"max_rounds ({self.max_rounds}) reached"
        bar = tqdm(range(1, int(self.max_rounds) + 1), desc="Cluster-GA", disable=not self.progress)
        for r in bar:
            g = self.estimate(f, theta, score, rng)
            norm = float(np.linalg.norm(g))
            if norm == 0.0:
                rounds[-1]["gradient"] = g.tolist()
                if self.gradient != "spsa":  # a deterministic estimate will not change: stop
                    reason = f"zero gradient estimate in round {r}"
                    break
                since += 1  # SPSA: this draw saw no difference; draw again next round
                rounds.append({"round": r, "theta": theta.tolist(), "weights": softmax(theta).tolist(), "score": score, "gradient": None,
                               "step": 0.0, "evaluations": calls[0], "note": "zero SPSA estimate: no step"})
                if since >= int(self.patience):
                    reason = f"no improvement over {self.tol} for {self.patience} round(s) (round {r})"
                    break
                continue
            eta = self.step_size / (1.0 + r - 1) ** self.step_decay
            step = eta * (g / norm if self.normalize else g)
            rounds[-1]["gradient"] = g.tolist()
            theta = theta + step
            score = f(theta)
            rounds.append({"round": r, "theta": theta.tolist(), "weights": softmax(theta).tolist(), "score": score, "gradient": None,
                           "step": float(np.linalg.norm(step)), "evaluations": calls[0]})
            bar.set_postfix(score=f"{score:.4f}")
            if score > best[0] + self.tol:
                best, since = (score, theta.copy(), r), 0
            else:
                since += 1
                if since >= int(self.patience):
                    reason = f"no improvement over {self.tol} for {self.patience} round(s) (round {r})"
                    break
        bt, bs, br = (best[1], best[0], best[2]) if self.return_point == "best" else (theta, score, len(rounds) - 1)
        return GAResult(bt, bs, br, theta, rounds, calls[0], reason)


# ----------------------------------------------------------------------------------------------
# the selector


class AutoScaleSelector(Selector):
    """AutoScale mixture selection (our design; see the module doc). `select(pool, budget, evaluator=...)`.

    Parameters: `n_clusters` (k-means on the embeddings); `embedding` ("graph_rae", or a pool column name
    holding vectors); Graph-RAE settings (`rae_epochs`, `rae_embed_dim`, `rae_hidden`, contrastive / metric
    weights) and scene-graph settings (`graph` dict for build_scene_graph); mixture start `init` ("size" =
    in proportion to cell sizes, i.e. vanilla co-training of everything; "uniform"; "balanced" = half real,
    half synthetic, each by size); cell orders `real_order`, `synthetic_order`; Cluster-GA settings (see
    `ClusterGA`).
    """

    method = "autoscale"
    needs = frozenset({"evaluator", "exclude", "report_dir"})  # the SelectionContext inputs it uses (curation/context.py)

    def __init__(self, n_clusters: int = 6, embedding: str = "graph_rae", rae_epochs: int = 20, rae_embed_dim: int = 32, rae_hidden: int = 64,
                 rae_contrastive_weight: float = 0.5, rae_metric_weight: float = 0.5, graph: dict | None = None, init: str = "size",
                 real_order: str = "random", synthetic_order: str = "retrieval", step_size: float = 0.5, gradient: str = "spsa",
                 perturbation: float = 0.5, spsa_samples: int = 1, max_rounds: int = 6, patience: int = 3, tol: float = 1e-3,
                 normalize: bool = True, step_decay: float = 0.0, return_point: str = "best", random_state: int = 0, progress: bool = False):
        self.n_clusters, self.embedding = n_clusters, embedding
        self.rae_epochs, self.rae_embed_dim, self.rae_hidden = rae_epochs, rae_embed_dim, rae_hidden
        self.rae_contrastive_weight, self.rae_metric_weight, self.graph = rae_contrastive_weight, rae_metric_weight, graph
        self.init, self.real_order, self.synthetic_order = init, real_order, synthetic_order
        self.step_size, self.gradient, self.perturbation, self.spsa_samples = step_size, gradient, perturbation, spsa_samples
        self.max_rounds, self.patience, self.tol, self.normalize = max_rounds, patience, tol, normalize
        self.step_decay, self.return_point, self.random_state, self.progress = step_decay, return_point, random_state, progress

    def ga(self) -> ClusterGA:
        return ClusterGA(self.step_size, self.gradient, self.perturbation, self.spsa_samples, self.max_rounds, self.patience, self.tol,
                         self.normalize, self.step_decay, self.return_point, self.random_state, self.progress)

    def _check(self) -> None:
        self.ga().check()
        if self.init not in ("size", "uniform", "balanced"):
            raise SelectionError(f"autoscale: init must be 'size', 'uniform' or 'balanced', got {self.init!r}")
        if self.real_order not in ("random", "centroid"):
            raise SelectionError(f"autoscale: real_order must be 'random' or 'centroid', got {self.real_order!r}")
        if self.synthetic_order not in ("retrieval", "random", "centroid"):
            raise SelectionError(f"autoscale: synthetic_order must be 'retrieval', 'random' or 'centroid', got {self.synthetic_order!r}")
        if int(self.n_clusters) < 1:
            raise SelectionError(f"autoscale: n_clusters must be >= 1, got {self.n_clusters!r}")

    # embedding and cells ----------------------------------------------------------------------
    def embed(self, pool, idx: np.ndarray) -> tuple[np.ndarray, dict]:
        """(len(idx), D) embeddings of the scenes at pool positions `idx`, and a description for the manifest."""
        if self.embedding != "graph_rae":
            from curation.features import column_matrix

            return column_matrix(pool, self.embedding)[idx], {"embedding": f"column:{self.embedding}"}
        from tqdm.auto import tqdm

        from curation.scene_graph import GraphRAEEncoder, build_scene_graph

        if not hasattr(pool, "dataset"):
            raise SelectionError(f"autoscale: embedding 'graph_rae' needs a ScenePool (maps and agents), got {type(pool).__name__}; "
                                 "or pass embedding=<column of vectors>")

        graphs = [build_scene_graph(pool[int(i)], **(self.graph or {})) for i in tqdm(idx, desc="scene graphs", disable=not self.progress)]
        enc = GraphRAEEncoder(self.rae_hidden, self.rae_embed_dim, epochs=self.rae_epochs, contrastive_weight=self.rae_contrastive_weight,
                              metric_weight=self.rae_metric_weight, random_state=self.random_state, progress=self.progress)
        Z = enc.fit_transform(graphs)
        h = enc.loss_history_
        return Z, {"embedding": "graph_rae", "rae_loss_first": h[0], "rae_loss_last": h[-1], "rae_epochs": len(h),
                   "mean_nodes": float(np.mean([g.num_nodes for g in graphs]))}

    def cells(self, Z: np.ndarray, sources: np.ndarray) -> tuple[list[dict], np.ndarray, np.ndarray]:
        """k-means clusters on standardised Z; (cells, labels, centroids). Each cell: cluster, source, members
        (positions into Z, in take order), distance of each member (retrieval / centroid; NaN for random)."""
        from sklearn.cluster import KMeans

        sd = Z.std(0)
        Zs = (Z - Z.mean(0)) / np.where(sd > 0, sd, 1.0)
        k = int(min(self.n_clusters, len(np.unique(Zs, axis=0))))
        km = KMeans(k, n_init=4, random_state=self.random_state).fit(Zs)
        labels, cent = km.labels_, km.cluster_centers_
        rng = np.random.default_rng(self.random_state)
        cells = []
        for c in range(k):
            for src in ("real", "synthetic"):
                mem = np.flatnonzero((labels == c) & (sources == src))
                if len(mem) == 0:
                    continue
                how = self.real_order if src == "real" else self.synthetic_order
                real_here = np.flatnonzero((labels == c) & (sources == "real"))
                if how == "retrieval" and len(real_here):
                    order, dist = retrieval_order(Zs[real_here], Zs[mem])
                    how_used = "retrieval: nearest real scene of the cluster"
                elif how in ("retrieval", "centroid"):
                    order, dist = retrieval_order(cent[c:c + 1], Zs[mem])
                    how_used = "centroid distance" + (" (no real scene in the cluster)" if how == "retrieval" else "")
                else:
                    order, dist = rng.permutation(len(mem)), np.full(len(mem), np.nan)
                    how_used = "seeded random order"
                cells.append({"cluster": int(c), "source": src, "members": mem[order], "distance": dist, "order": how_used})
        return cells, labels, cent

    # selection --------------------------------------------------------------------------------
    def _select(self, pool, budget: int, ctx) -> Selection:
        evaluator, exclude, report_dir = ctx.evaluator, ctx.exclude, ctx.report_dir
        self._check()
        if evaluator is None:
            raise SelectionError("autoscale: needs closed-loop feedback: pass evaluator= (a MixtureEvaluator with evaluate(ids), e.g. "
                                 "eval.autoscale_feedback.ClosedLoopFeedback, or a PilotTrainer)")
        ids_all = pool.ids
        excluded = set(exclude)
        idx = np.array([i for i, s in enumerate(ids_all) if s not in excluded], dtype=np.int64)
        n = check_budget(budget, len(idx), "pool (minus excluded scenes)")
        ids = [ids_all[i] for i in idx]
        sources = np.asarray(pool.column("source"), dtype=object)[idx].astype(str)
        Z, emb_state = self.embed(pool, idx)
        cells, labels, _ = self.cells(Z, sources)
        cap = np.array([len(c["members"]) for c in cells], np.int64)
        synth = np.array([c["source"] == "synthetic" for c in cells])

        def mixture(theta) -> tuple[list[int], np.ndarray]:
            counts = allocate_budget(softmax(theta), cap, n)
            take = [int(m) for c, k in zip(cells, counts) for m in c["members"][:k]]
            return take, counts

        cache: dict[tuple, float] = {}
        log: list[dict] = []

        def F(theta) -> float:
            take, counts = mixture(theta)
            key = tuple(int(k) for k in counts)
            if key not in cache:
                score, metrics = feedback_score(evaluator, [ids[i] for i in take])
                cache[key] = score
                log.append({"counts": list(key), "score": score, "synthetic": int(counts[synth].sum()),
                            **{k: v for k, v in metrics.items() if k != "score" and isinstance(v, (int, float))}})
            return cache[key]

        if self.init == "size":
            theta0 = np.log(cap.astype(float))
        elif self.init == "uniform":
            theta0 = np.zeros(len(cap))
        else:  # balanced: half real, half synthetic (by size within each), or all of the one source present
            share = np.where(synth, cap / max(cap[synth].sum(), 1), cap / max(cap[~synth].sum(), 1))
            theta0 = np.log(np.maximum(share, 1e-12))
        res = self.ga().optimize(F, theta0)

        rounds = []
        for r in res.rounds:
            _, counts = mixture(np.asarray(r["theta"]))
            s = int(counts[synth].sum())
            rounds.append({"round": r["round"], "score": r["score"], "weights": [round(w, 6) for w in r["weights"]],
                           "counts": counts.tolist(), "real": n - s, "synthetic": s, "synthetic_fraction": s / n,
                           "ratio": f"{n - s}:{s}", "step": r["step"], "gradient": r["gradient"], "evaluations": r["evaluations"],
                           **({"note": r["note"]} if "note" in r else {})})
        # fitted state for callers (not in the manifest): each round's mixture, the embeddings and clusters
        self.mixtures_ = {r["round"]: [ids[i] for i in mixture(np.asarray(r["theta"]))[0]] for r in res.rounds}
        self.embeddings_, self.labels_, self.ids_ = Z, labels, ids
        take, counts = mixture(res.best_theta)
        w = softmax(res.best_theta)
        out_ids, scores, reasons, cl, src = [], [], [], [], []
        for ci in np.argsort(-w, kind="stable"):
            c = cells[ci]
            for r, m in enumerate(c["members"][: counts[ci]]):
                d = c["distance"][r]
                out_ids.append(ids[int(m)])
                scores.append(float(w[ci]))
                cl.append(c["cluster"])
                src.append(c["source"])
                reasons.append(f"cluster {c['cluster']} {c['source']} cell: weight {w[ci]:.3f}, {counts[ci]} of {cap[ci]} taken; "
                               f"#{r + 1} by {c['order']}" + (f" (distance {d:.3f})" if np.isfinite(d) else ""))
        s = int(counts[synth].sum())
        state = {
            **emb_state, "n_clusters": int(labels.max() + 1),
            "clusters": [{"cluster": int(k), "real": int(((labels == k) & (sources == "real")).sum()),
                          "synthetic": int(((labels == k) & (sources == "synthetic")).sum())} for k in range(int(labels.max() + 1))],
            "cells": [{"cluster": c["cluster"], "source": c["source"], "size": int(len(c["members"])), "order": c["order"],
                       "initial_weight": float(wi), "final_weight": float(wf), "selected": int(k)}
                      for c, wi, wf, k in zip(cells, softmax(theta0), w, counts)],
            "rounds": rounds, "best_round": res.best_round, "best_score": res.best_score, "initial_score": res.rounds[0]["score"],
            "stop_reason": res.stop_reason, "evaluations": len(log), "objective_calls": res.evaluations, "evaluation_log": log,
            "real": n - s, "synthetic": s, "synthetic_fraction": s / n, "ratio": f"{n - s}:{s}", "excluded": len(excluded & set(ids_all)),
        }
        if report_dir is not None:
            state["plot"] = str(plot_rounds(rounds, cells, Path(report_dir) / "autoscale_rounds.png"))
        return Selection(ids=out_ids, scores=scores, reasons=reasons, method=self.method, budget=n, seed=self.random_state,
                         config=self.get_params(), state=state, pool=pool_info(pool), extra={"cluster": cl, "source": src})


def plot_rounds(rounds: list[dict], cells: list[dict], path: str | os.PathLike) -> Path:
    """PNG: per round, the budget share of each cluster (synthetic part hatched) and the score and synthetic
    fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import save_figure

    R = len(rounds)
    counts = np.array([r["counts"] for r in rounds], float)
    total = counts.sum(1, keepdims=True)
    share = counts / np.where(total > 0, total, 1)
    clusters = sorted({c["cluster"] for c in cells})
    cmap = plt.get_cmap("tab10")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    bottom = np.zeros(R)
    x = np.arange(R)
    for k in clusters:
        for j, c in enumerate(cells):
            if c["cluster"] != k:
                continue
            a1.bar(x, share[:, j], bottom=bottom, color=cmap(k % 10), hatch="//" if c["source"] == "synthetic" else None,
                   edgecolor="white", label=f"cluster {k} {c['source']}")
            bottom += share[:, j]
    a1.set_ylabel("share of the budget")
    a1.set_title("AutoScale mixture per round (hatched = synthetic)", fontsize=10)
    a1.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.02), frameon=False)
    a2.plot(x, [r["score"] for r in rounds], "o-", color="tab:blue", label="closed-loop score")
    a2.set_ylabel("score", color="tab:blue")
    a3 = a2.twinx()
    a3.plot(x, [r["synthetic_fraction"] for r in rounds], "s--", color="tab:red", label="synthetic fraction")
    a3.set_ylabel("synthetic fraction", color="tab:red")
    a3.set_ylim(0, 1)
    a2.set_xlabel("round")
    a2.set_xticks(x)
    fig.tight_layout()
    return save_figure(fig, path)
