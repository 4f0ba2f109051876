"""k-center greedy (Gonzalez 1985; the Coreset active-learning selector of Sener & Savarese 2018).

Greedy: repeatedly add the point farthest from the current centres; the covering radius
max_x min_c ||x - c|| is within a factor 2 of the optimum.

- `method="exact"`: the rule itself, one pass over all N points per centre (N·d work per step and
  memory-bound: 10k centres × 1M × 128 floats is tens of minutes on 2 cores).
- `method="partitioned"` — an APPROXIMATION (OURS, "neighbourhood-local farthest-first traversal"):
  the pool is split into C cells by k-means (faiss, on a 32-d PCA projection). Every point keeps a
  stored distance² to the chosen centres; a new centre updates only its own cell and the `neighbours`
  cells with the nearest centroids, and a max-heap over cells picks the largest stored value next. A step
  costs (1 + neighbours) cells' points instead of all N. Stored values never fall below the true ones,
  so a chosen point may already be covered by a centre outside its neighbourhood (a partly wasted
  centre) and the reported radius (the largest stored value) is an upper bound on the true covering
  radius. benchmarks/curation_scale.py reports its radius against exact greedy on a subsample.
- `method="auto"`: exact when N·k <= `exact_work` (default 5e8), else partitioned.

Cells: C = clip(k // cell_centres, 1, 4096) (about `cell_centres` centres per cell, default 8);
neighbours = 16 by default. On the benchmark's clustered 100k x 128 pool with k = 1000 the partitioned
covering radius is 1.09x exact greedy's in 0.7x its CPU time (4 neighbours: about 1.28x); 10k centres
from 1M x 128 take about 45 s on 2 shared cores (benchmarks/curation_scale.py).
Distances are Euclidean, computed as ||x||² - 2 x·c + ||c||² in the dtype of X (float32 for big pools).
"""
from __future__ import annotations

import heapq
import math

import numpy as np
from tqdm.auto import tqdm


def covering_radius(X: np.ndarray, centers, chunk: int = 32768) -> float:
    """max over points of the distance to the nearest of `centers` (indices into X)."""
    C = X[np.asarray(centers)]
    return float(np.sqrt(max(0.0, float(_min_sqdist(X, C, chunk).max()))))


def _min_sqdist(X: np.ndarray, C: np.ndarray, chunk: int = 32768) -> np.ndarray:
    out = np.empty(len(X), dtype=np.float64)
    C = C.astype(X.dtype)
    cc = (C ** 2).sum(1)
    for s in range(0, len(X), chunk):
        x = X[s:s + chunk]
        d = (x ** 2).sum(1)[:, None] - 2.0 * (x @ C.T) + cc[None, :]
        out[s:s + chunk] = np.maximum(d.min(1), 0)
    return out


def kcenter_greedy(X: np.ndarray, k: int, *, initial=None, method: str = "auto", cell_centres: int = 8, neighbours: int = 16,
                   exact_work: float = 5e8, random_state: int = 0, progress: bool = False) -> dict:
    """Select `k` new centres. Returns {"order": indices in selection order, "gain": each chosen point's
    (stored) distance to the centres chosen before it (inf for a random first centre), "radius_upper_bound"
    (the covering radius for exact; an upper bound for partitioned), "method", "n_cells"}.

    `initial`: indices already selected; they count as centres and are never returned. Without them the
    first centre is a uniformly random point (seeded by `random_state`).
    """
    X = np.ascontiguousarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32)
    n = len(X)
    initial = np.unique(np.asarray([] if initial is None else initial, dtype=np.int64))
    if k < 0 or k > n - len(initial):
        raise ValueError(f"kcenter_greedy: k={k} but only {n - len(initial)} points are not yet selected")
    rng = np.random.default_rng(random_state)
    first = None if len(initial) or k == 0 else int(rng.integers(n))  # drawn first: all methods share it
    if method == "auto":
        method = "exact" if float(n) * k <= exact_work else "partitioned"
    if method == "exact":
        order, gain, radius = _greedy_exact(X, k, initial, first, progress)
        cells = 1
    elif method == "partitioned":
        order, gain, radius, cells = _greedy_cells(X, k, initial, first, rng, cell_centres, neighbours, progress)
    else:
        raise ValueError(f"kcenter_greedy: method must be 'auto', 'exact' or 'partitioned', got {method!r}")
    return {"order": order, "gain": gain, "radius_upper_bound": radius, "method": method, "n_cells": cells}


def _greedy_exact(X, k, initial, first, progress):
    sqn = (X ** 2).sum(1)
    mind = _min_sqdist(X, X[initial]).astype(X.dtype) if len(initial) else np.full(len(X), np.inf, dtype=X.dtype)
    mind[initial] = -np.inf  # selected points are never chosen again (matters for duplicate points)
    nxt = first
    order, gain = np.empty(k, np.int64), np.empty(k, np.float64)
    for step in tqdm(range(k), desc="k-center (exact)", disable=not progress):
        p = int(np.argmax(mind)) if nxt is None else nxt
        nxt = None
        order[step], gain[step] = p, math.sqrt(max(float(mind[p]), 0.0))
        np.minimum(mind, np.maximum(sqn - 2.0 * (X @ X[p]) + sqn[p], 0), out=mind)
        mind[p] = -np.inf
    return order, gain, math.sqrt(max(float(mind.max()), 0.0)) if len(X) > k + len(initial) else 0.0


def _pca(X: np.ndarray, dim: int, rng, fit_rows: int = 50_000) -> np.ndarray:
    if X.shape[1] <= dim:
        return np.ascontiguousarray(X, dtype=np.float32)
    sub = X[rng.choice(len(X), min(len(X), fit_rows), replace=False)].astype(np.float64)
    mu = sub.mean(0)
    C = (sub - mu).T @ (sub - mu)  # d x d: eigh of the scatter matrix is far cheaper than an SVD of the rows
    w, v = np.linalg.eigh(C)
    W = v[:, np.argsort(w)[::-1][:dim]].astype(np.float32)
    out = np.empty((len(X), dim), np.float32)
    for s in range(0, len(X), 65536):
        out[s:s + 65536] = (X[s:s + 65536].astype(np.float32) - mu.astype(np.float32)) @ W
    return out


def kmeans_cells(X: np.ndarray, n_cells: int, rng, pca_dim: int = 32, points_per_cell: int = 32, niter: int = 10):
    """(labels, centroids in the PCA space, PCA-projected X): k-means cells for the partitioned greedy."""
    Z = _pca(X, pca_dim, rng)
    n_cells = max(1, min(n_cells, len(X)))
    sub = Z[rng.choice(len(Z), min(len(Z), n_cells * points_per_cell), replace=False)]
    try:
        import faiss

        km = faiss.Kmeans(Z.shape[1], n_cells, niter=niter, seed=int(rng.integers(2**31 - 1)), verbose=False,
                          max_points_per_centroid=points_per_cell, min_points_per_centroid=1)
        km.train(sub)
        _, lab = km.index.search(Z, 1)
        return lab[:, 0].astype(np.int64), km.centroids, Z
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(n_cells, random_state=int(rng.integers(2**31 - 1)), n_init=1).fit(sub)
        return km.predict(Z).astype(np.int64), km.cluster_centers_.astype(np.float32), Z


def _greedy_cells(X, k, initial, first, rng, cell_centres, neighbours, progress):
    """Greedy over k-means cells with a max-heap of per-cell radii (see the module docstring)."""
    n_cells = int(np.clip(k // max(1, cell_centres), 1, 4096))
    lab, centroids, _ = kmeans_cells(X, n_cells, rng)
    C = len(centroids)
    perm = np.argsort(lab, kind="stable")
    start = np.searchsorted(lab[perm], np.arange(C + 1))
    members = [perm[start[j]:start[j + 1]] for j in range(C)]
    # each new centre updates its own cell and the `neighbours` cells with the nearest centroids
    cd = ((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    near = np.argsort(cd, axis=1)[:, 1:neighbours + 1] if neighbours > 0 else np.zeros((C, 0), np.int64)
    sqn = (X ** 2).sum(1)
    if first is None:
        dist = _min_sqdist(X, X[initial])
        dist[initial] = -np.inf
    else:  # the random first centre, then one exact pass so every stored distance is finite
        dist = np.maximum(sqn - 2.0 * (X @ X[first]) + sqn[first], 0).astype(np.float64)
        dist[first] = -np.inf
    order, gain = np.empty(k, np.int64), np.empty(k, np.float64)
    step = 0
    if first is not None and k:
        order[0], gain[0], step = first, math.inf, 1
    mind = [dist[m] for m in members]  # stored distance² of each member: never below the true one
    del dist
    cur = np.array([float(d.max()) if len(d) else -np.inf for d in mind])
    heap = [(-cur[j], j) for j in range(C) if len(members[j])]
    heapq.heapify(heap)
    bar = tqdm(total=k, initial=step, desc="k-center (partitioned)", disable=not progress)
    while step < k:
        r2, j = heapq.heappop(heap)
        if -r2 != cur[j]:  # stale entry left by a neighbour update
            heapq.heappush(heap, (-cur[j], j))
            continue
        m = members[j]
        local = int(np.argmax(mind[j]))
        p = int(m[local])
        order[step], gain[step] = p, math.sqrt(max(float(mind[j][local]), 0.0))
        step += 1
        bar.update(1)
        for c in (j, *near[j]):
            mc = members[c]
            if len(mc):
                mind[c] = np.minimum(mind[c], np.maximum(sqn[mc] - 2.0 * (X[mc] @ X[p]) + sqn[p], 0))
                cur[c] = float(mind[c].max())

        mind[j][local] = -np.inf
        cur[j] = float(mind[j].max())
        heapq.heappush(heap, (-cur[j], j))
    bar.close()
    # stored distances count only some centres, so the true radius is never larger
    radius = math.sqrt(max(0.0, float(cur.max()))) if C and np.isfinite(cur.max()) else 0.0
    return order, gain, radius, C


def distributed_kcenter(X: np.ndarray, k: int, n_shards: int, *, random_state: int = 0) -> np.ndarray:
    """Two-round k-center (Malkomes et al., NeurIPS 2015, "Fast Distributed k-Center Clustering with Outliers on
    Massive Data", Alg. GREEDY-MR): exact greedy k-center on each of `n_shards` fixed contiguous shards, then
    greedy over the union of the shard centres. Guarantee: radius <= 4 x optimum. Returns k indices into X.
    Shards are fixed slices, so the result does not depend on how shards are scheduled."""
    X = np.ascontiguousarray(X)
    n = len(X)
    if not 0 < k <= n or n_shards < 1:
        raise ValueError(f"distributed_kcenter: need 0 < k <= {n} and n_shards >= 1, got k={k}, n_shards={n_shards}")
    bounds = np.linspace(0, n, n_shards + 1).astype(np.int64)
    union = []
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            r = kcenter_greedy(X[a:b], min(k, int(b - a)), method="exact", random_state=random_state + s)
            union.append(a + r["order"])
    union = np.concatenate(union)
    r = kcenter_greedy(X[union], k, method="exact", random_state=random_state)
    return union[r["order"]]
