"""Semantic scoring (Inoue & Fukushima, "Semantics-Aware Scene Encoder"): error patterns -> contrastive scene
embedding -> safety-criticality S, rarity R, uncertainty U -> value Q. Our choices: docs/methods/semantic_scoring.md.

1. Error pattern (paper eq. 2): deviations e(t+D) = plan - ground truth, D = 1..H (H = 5); the window start t*
   maximises D(t) = sqrt(sum_D alpha_D ||e(t+D)||^2); e_i = [alpha_D e(t*+D)]_D, an (H, 2) sequence.
   OURS (the paper's "scene" is a 20 s nuScenes clip with a plan at every step; a ScenePool row is one
   planning moment): for one (K, 2) plan per scene, windows slide along the plan's own horizon,
   t in {0 .. K-H}; `error_patterns` also takes (T_ref, K, 2) plans made at several reference times.
   Deviations are in the current ego frame (metres).
2. Safety descriptor (eq. 3): c(t) = exp(-d_min(t) / sigma), sigma = 1 m, d_min = the smallest distance
   between the ego footprint at the planned pose of step t and any agent footprint at that time (shapely
   box-to-box distance, 0 on overlap); s_i = [beta_D c(t*+D)]_D. OURS: agents come from the row at the frame
   whose time matches the step (constant-velocity extrapolation of the current agents when the row has no
   such frame); road boundaries are not objects here; `safety_path="gt"` measures along the logged ego
   future instead of the plan (a planner-free variant); the ego box comes from meta "ego_size"
   (length, width, rear_axle_to_center) or the defaults below.
3. Encoder (curation/scene_encoder.py) trained on the labelled set T with the supervised contrastive loss,
   tau_c = 0.07, positives = pairs within the batch's 10th-percentile descriptor distance. OURS: inputs are
   divided by their RMS over T (`input_scale_`); default 100 epochs (paper: 3000) of Adam, lr 1e-3.
4. Scores on the candidate pool C:
   S_i = max_{h in H} exp(-||z_i - z_h||^2 / (2 tau_s)), tau_s = 0.5, H = the top 10 % of T by max_D s_i
   (at least one scene; OURS: ceil);
   R_i = -log( 1/K sum_{j in kNN(i)} exp(-||z_i - z_j||^2 / (2 sigma_r^2)) ), K = 20 neighbours among the pool's
   embeddings (self excluded), sigma_r = the median distance to the K-th neighbour (OURS: K shrinks to N-1
   on small pools; a zero median falls back to 1);
   U_i = tr(Cov_k z_{i,k}) over K_mc = 10 MC-dropout embeddings (sample covariance, K_mc - 1);
   Q_i = w_S S_i/sigma_S + w_R R_i/sigma_R + w_U U_i/sigma_U, sigma = the pool's standard deviation of the
   component (a constant component contributes 0). z_i for S and R is the dropout-free embedding.
5. The paper's check: Pearson correlation between the embedding distance and |difference of max_D s| over
   each scene's 10 nearest neighbours (positive = embedding proximity tracks safety); a 2-D map (PCA or
   t-SNE) coloured by max_D s.

Predictions come from the caller (a planner's (K, 3) or (K, 2) ego-frame poses per scene: a mapping, a
.json / .npz file, or an object with `predict_trajectories(ids) -> mapping`) so curation never imports a
model; without them the selector falls back to a constant-turn-rate-and-velocity planner (recorded).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from common.constants import REAR_AXLE_TO_CENTER  # m; overridden by meta "ego_size"
from common.geometry import box_corners, local_to_global
from curation.selection import Selection, SelectionError, Selector, check_budget, pool_info

EGO_LENGTH, EGO_WIDTH = 5.0, 2.0  # m; overridden by meta "ego_size"


@runtime_checkable
class TrajectoryPredictor(Protocol):
    """A planner that returns {id: (K, 3) poses (x, y, heading), current ego frame, every `interval` s}."""

    def predict_trajectories(self, ids: Sequence[str]) -> Mapping[str, np.ndarray]: ...


# ----------------------------------------------------------------------------------------------
# error patterns and safety descriptors


def error_patterns(pred: np.ndarray, gt: np.ndarray, horizon: int = 5, weights: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Representative error patterns (paper eq. 2).

    `pred`, `gt`: (N, K, >=2) one plan per scene (windows slide along the plan's steps, t in 0..K-H) or
    (N, T_ref, K, >=2) plans at T_ref reference times (t indexes them; the window is steps 1..H of each).
    Returns (patterns (N, H, 2) = [alpha_D e(t*+D)], t_star (N,), D (N, n_windows)). Ties take the earliest t.
    """
    pred, gt = np.asarray(pred, float)[..., :2], np.asarray(gt, float)[..., :2]
    if pred.shape != gt.shape or pred.ndim not in (3, 4):
        raise SelectionError(f"error_patterns: pred and gt must both be (N, K, 2) or (N, T_ref, K, 2), got {pred.shape} and {gt.shape}")
    H = int(horizon)
    alpha = np.ones(H) if weights is None else np.asarray(weights, float)
    if alpha.shape != (H,) or (alpha < 0).any():
        raise SelectionError(f"error_patterns: weights must be {H} non-negative numbers, got {weights!r}")
    dev = pred - gt
    if dev.ndim == 3:  # one plan: window t covers plan steps t+1..t+H
        K = dev.shape[1]
        if K < H:
            raise SelectionError(f"error_patterns: plans have {K} poses, fewer than the horizon H={H}")
        windows = np.stack([dev[:, t:t + H] for t in range(K - H + 1)], 1)  # (N, W, H, 2)
    else:
        if dev.shape[2] < H:
            raise SelectionError(f"error_patterns: plans have {dev.shape[2]} poses, fewer than the horizon H={H}")
        windows = dev[:, :, :H]
    D = np.sqrt((alpha * (windows ** 2).sum(-1)).sum(-1))  # (N, W)
    t_star = D.argmax(1)
    patterns = alpha[:, None] * windows[np.arange(len(dev)), t_star]
    return patterns, t_star, D


def _ego_size(meta: dict, default=(EGO_LENGTH, EGO_WIDTH, REAR_AXLE_TO_CENTER)) -> tuple[float, float, float]:
    size = meta.get("ego_size") or {}
    return (float(size.get("length", default[0])), float(size.get("width", default[1])), float(size.get("rear_axle_to_center", default[2])))


def min_distances(scene, path: np.ndarray, times: np.ndarray, ego_size: tuple[float, float, float] | None = None) -> np.ndarray:
    """(K,) smallest ego-box to agent-box distance (m; 0 on overlap, inf without agents) at each pose of
    `path` ((K, 3) rear-axle poses, global frame) at `times` (s after the current frame)."""
    import shapely

    length, width, r2c = ego_size or _ego_size(scene.meta)
    t_row = np.asarray(scene["ego"]["t"], float)
    now = scene.agents_at()
    out = np.full(len(path), np.inf)
    for k, (pose, tk) in enumerate(zip(path, times)):
        f = int(np.argmin(np.abs(t_row - tk))) if len(t_row) else -1
        if f >= 0 and abs(t_row[f] - tk) < 0.05:
            a = scene.agents_at(f)
            xy, heading, L, W = a.xy, a.heading, a.length, a.width
        else:  # OURS: the row does not reach this time; agents move on at constant velocity
            xy, heading, L, W = now.xy + now.velocity * tk, now.heading, now.length, now.width
        if len(xy) == 0:
            continue
        c = pose[:2] + r2c * np.array([np.cos(pose[2]), np.sin(pose[2])])
        ego = shapely.polygons(box_corners(c[0], c[1], pose[2], length, width))
        others = shapely.polygons(box_corners(xy[:, 0], xy[:, 1], heading, L, W))
        out[k] = float(shapely.distance(ego, others).min())
    return out


def safety_descriptors(scenes: Sequence, paths_ego: np.ndarray, t_star: np.ndarray, horizon: int = 5, interval: float = 0.5,
                       sigma: float = 1.0, weights: Sequence[float] | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Safety-state descriptors s_i = [beta_D exp(-d_min(t*+D) / sigma)]_D (paper eq. 3) for single-plan windows.

    `paths_ego` (N, K, 3): the ego path (plan or logged future) in each scene's current ego frame at
    `interval` s steps. Returns (s (N, H), d_min (N, H) in metres)."""
    from tqdm.auto import tqdm

    H = int(horizon)
    beta = np.ones(H) if weights is None else np.asarray(weights, float)
    s, dmin = np.zeros((len(scenes), H)), np.zeros((len(scenes), H))
    for i, scene in enumerate(tqdm(scenes, desc="safety descriptors", disable=not progress)):
        steps = np.arange(int(t_star[i]), int(t_star[i]) + H)  # plan indices of steps t*+1 .. t*+H
        path = local_to_global(np.asarray(paths_ego[i], float)[steps], scene.ego_pose())
        d = min_distances(scene, path, (steps + 1) * interval)
        dmin[i] = d
        s[i] = beta * np.exp(-d / sigma)
    return s, dmin


def ctrv_predictions(scenes: Sequence, num_poses: int = 8, interval: float = 0.5) -> np.ndarray:
    """(N, K, 3) constant turn-rate and velocity plans from each scene's current speed and yaw rate (ego frame):
    the planner-free fallback when no predictions are given."""
    out = np.zeros((len(scenes), num_poses, 3))
    t = np.arange(1, num_poses + 1) * interval
    for i, sc in enumerate(scenes):
        v, w = float(sc["ego"]["speed"][sc.current_index]), float(sc["ego"]["yaw_rate"][sc.current_index])
        h = w * t
        if abs(w) < 1e-6:
            x, y = v * t, np.zeros_like(t)
        else:
            x, y = v / w * np.sin(h), v / w * (1.0 - np.cos(h))
        out[i] = np.stack([x, y, h], -1)
    return out


def resolve_predictions(predictions, ids: Sequence[str], num_poses: int) -> tuple[np.ndarray, list[str]]:
    """(N, K, 3) ego-frame poses in the order of `ids` (NaN rows where missing) and the missing ids.

    `predictions`: a mapping {id: (K, 2|3)}, a .json file ({id: poses}) or .npz file (arrays `ids`, `poses`),
    or a `TrajectoryPredictor`. Headings missing from (K, 2) plans are taken from the direction of travel."""
    if isinstance(predictions, (str, os.PathLike)):
        path = Path(predictions)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: predictions file not found")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "ids" not in z or "poses" not in z:
                    raise SelectionError(f"{path}: expected arrays 'ids' and 'poses' (N, K, 3), got {sorted(z.files)}")
                predictions = dict(zip(z["ids"].astype(str).tolist(), z["poses"]))
        elif path.suffix == ".json":
            predictions = json.loads(path.read_text())
            if not isinstance(predictions, dict):
                raise SelectionError(f"{path}: expected a JSON object {{id: [[x, y, heading], ...]}}")
        else:
            raise SelectionError(f"{path}: expected a .json or .npz predictions file, got suffix {path.suffix!r}")
    elif isinstance(predictions, TrajectoryPredictor):
        predictions = predictions.predict_trajectories(list(ids))
    if not isinstance(predictions, Mapping):
        raise SelectionError(f"predictions: expected a mapping, a file or a TrajectoryPredictor, got {type(predictions).__name__}")
    out = np.full((len(ids), num_poses, 3), np.nan)
    missing = []
    for i, sid in enumerate(ids):
        p = predictions.get(sid)
        if p is None:
            missing.append(sid)
            continue
        p = np.asarray(p, float)
        if p.ndim != 2 or p.shape[1] not in (2, 3) or len(p) < num_poses or not np.isfinite(p).all():
            raise SelectionError(f"predictions: scene {sid!r}: expected {num_poses} finite poses (K, 2) or (K, 3), got shape {p.shape}")
        p = p[:num_poses]
        if p.shape[1] == 2:
            d = np.diff(np.vstack([[0.0, 0.0], p]), axis=0)
            p = np.concatenate([p, np.arctan2(d[:, 1], d[:, 0])[:, None]], 1)
        out[i] = p
    return out, missing


# ----------------------------------------------------------------------------------------------
# the geometric scores


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def safety_criticality(Z: np.ndarray, Z_hazard: np.ndarray, tau_s: float = 0.5) -> np.ndarray:
    """S_i = max_h exp(-||z_i - z_h||^2 / (2 tau_s))."""
    Z, Zh = np.asarray(Z, float), np.asarray(Z_hazard, float)
    if len(Zh) == 0:
        raise SelectionError("safety_criticality: no hazardous exemplars")
    return np.exp(-_sq_dists(Z, Zh) / (2.0 * tau_s)).max(1)


def rarity(Z: np.ndarray, k: int = 20, bandwidth: float | None = None) -> tuple[np.ndarray, float, int]:
    """R_i = -log mean_{j in kNN(i)} exp(-||z_i - z_j||^2 / (2 sigma_r^2)) over the pool (self excluded).

    sigma_r = `bandwidth` or the median distance to the k-th neighbour. Returns (R, sigma_r, k used)."""
    Z = np.asarray(Z, float)
    if len(Z) < 2:
        raise SelectionError(f"rarity: needs at least 2 embeddings, got {len(Z)}")
    k = int(min(k, len(Z) - 1))
    d2 = _sq_dists(Z, Z)
    np.fill_diagonal(d2, np.inf)
    nn = np.sort(d2, axis=1)[:, :k]  # (N, k) squared distances to the k nearest
    if bandwidth is None:
        bandwidth = float(np.median(np.sqrt(nn[:, -1])))
        bandwidth = bandwidth if bandwidth > 0 else 1.0
    p = np.exp(-nn / (2.0 * bandwidth ** 2)).mean(1)
    return -np.log(np.maximum(p, np.finfo(float).tiny)), float(bandwidth), k


def mc_uncertainty(Z_mc: np.ndarray) -> np.ndarray:
    """U_i = trace of the sample covariance (ddof 1) of scene i's MC-dropout embeddings; `Z_mc` (N, K_mc, D)."""
    Z_mc = np.asarray(Z_mc, float)
    if Z_mc.ndim != 3 or Z_mc.shape[1] < 2:
        raise SelectionError(f"mc_uncertainty: expected (N, K_mc >= 2, D) embeddings, got shape {Z_mc.shape}")
    return Z_mc.var(axis=1, ddof=1).sum(-1)


def value_score(S: np.ndarray, R: np.ndarray, U: np.ndarray, weights: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, dict]:
    """Q = w_S S/sigma_S + w_R R/sigma_R + w_U U/sigma_U (population std over the pool; a constant component adds 0).
    Returns (Q, {"sigma_S", "sigma_R", "sigma_U"})."""
    Q = np.zeros(len(S))
    sig = {}
    for name, x, w in zip("SRU", (S, R, U), weights):
        x = np.asarray(x, float)
        sd = float(x.std())
        sig[f"sigma_{name}"] = sd
        if sd > 0:
            Q += float(w) * x / sd
    return Q, sig


def embedding_safety_correlation(Z: np.ndarray, criticality: np.ndarray, k: int = 10) -> dict:
    """The paper's check: Pearson r between ||z_i - z_j|| and |c_i - c_j| over each i's k nearest neighbours.
    Returns {"pearson_r", "pairs", "k"} (r is NaN when either side is constant)."""
    Z, c = np.asarray(Z, float), np.asarray(criticality, float)
    k = int(min(k, len(Z) - 1))
    if k < 1:
        return {"pearson_r": float("nan"), "pairs": 0, "k": k}
    d2 = _sq_dists(Z, Z)
    np.fill_diagonal(d2, np.inf)
    nn = np.argsort(d2, axis=1, kind="stable")[:, :k]
    rows = np.repeat(np.arange(len(Z)), k)
    dist = np.sqrt(d2[rows, nn.ravel()])
    diff = np.abs(c[rows] - c[nn.ravel()])
    r = float(np.corrcoef(dist, diff)[0, 1]) if dist.std() > 0 and diff.std() > 0 else float("nan")
    return {"pearson_r": r, "pairs": int(len(dist)), "k": k}


def plot_embedding_map(Z: np.ndarray, color: np.ndarray, path: str | os.PathLike, method: str = "pca", random_state: int = 0,
                       title: str = "scene embeddings coloured by safety criticality", mark: np.ndarray | None = None) -> Path:
    """A 2-D map of the embeddings (PCA, or t-SNE with perplexity min(30, (N-1)/3)) coloured by `color`; points in
    `mark` (bool) are circled (e.g. the selected scenes). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import save_figure

    Z = np.asarray(Z, float)
    if method == "tsne" and len(Z) > 4:
        from sklearn.manifold import TSNE

        Y = TSNE(2, perplexity=float(min(30.0, (len(Z) - 1) / 3.0)), init="pca", random_state=random_state).fit_transform(Z)
    elif method in ("pca", "tsne"):
        from sklearn.decomposition import PCA

        Y = PCA(2, random_state=random_state).fit_transform(Z) if len(Z) > 2 else np.zeros((len(Z), 2))
    else:
        raise SelectionError(f"plot_embedding_map: method must be 'pca' or 'tsne', got {method!r}")
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(Y[:, 0], Y[:, 1], c=color, cmap="inferno", s=14)
    if mark is not None and np.any(mark):
        ax.scatter(Y[mark, 0], Y[mark, 1], facecolors="none", edgecolors="tab:cyan", s=60, linewidths=1.0, label="selected")
        ax.legend(loc="best")
    fig.colorbar(sc, ax=ax, label="max soft collision cost  max_D s_i")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# the estimator


class SemanticScorer:
    """Trains the scene encoder on labelled error patterns + safety descriptors, then scores candidates.

    fit(patterns (N, H, 2), descriptors (N, H)) -> self;  score(patterns) -> dict of S, R, U, Q, Z."""

    def __init__(self, embed_dim: int = 128, hidden: int = 128, num_layers: int = 2, num_heads: int = 4, dropout: float = 0.1,
                 temperature: float = 0.07, positive_percentile: float = 10.0, epochs: int = 100, batch_size: int = 256,
                 lr: float = 1e-3, weight_decay: float = 0.0, hazard_fraction: float = 0.1, tau_s: float = 0.5, k_rarity: int = 20,
                 mc_samples: int = 10, weights: Sequence[float] = (1.0, 1.0, 1.0), random_state: int = 0, progress: bool = False,
                 num_threads: int | None = 1):
        self.num_threads = num_threads
        self.embed_dim, self.hidden, self.num_layers, self.num_heads, self.dropout = embed_dim, hidden, num_layers, num_heads, dropout
        self.temperature, self.positive_percentile = temperature, positive_percentile
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.hazard_fraction, self.tau_s, self.k_rarity, self.mc_samples = hazard_fraction, tau_s, k_rarity, mc_samples
        self.weights, self.random_state, self.progress = tuple(weights), random_state, progress

    def _tensor(self, patterns):
        import torch

        return torch.as_tensor(np.asarray(patterns, np.float32) / self.input_scale_)

    def fit(self, patterns: np.ndarray, descriptors: np.ndarray) -> "SemanticScorer":
        from curation.scene_encoder import torch_threads

        with torch_threads(self.num_threads):
            return self._fit(patterns, descriptors)

    def _fit(self, patterns: np.ndarray, descriptors: np.ndarray) -> "SemanticScorer":
        import torch
        from tqdm.auto import tqdm

        from curation.scene_encoder import SceneEncoder, percentile_positives, supcon_loss

        patterns, descriptors = np.asarray(patterns, np.float32), np.asarray(descriptors, np.float64)
        if patterns.ndim != 3 or len(patterns) != len(descriptors) or len(patterns) < 2:
            raise SelectionError(f"SemanticScorer.fit: expected (N >= 2, H, 2) patterns and (N, H) descriptors, got {patterns.shape} and {descriptors.shape}")
        rms = float(np.sqrt((patterns ** 2).mean()))
        self.input_scale_ = rms if rms > 0 else 1.0
        torch.manual_seed(self.random_state)
        self.encoder_ = SceneEncoder(patterns.shape[-1], self.hidden, self.embed_dim, self.num_layers, self.num_heads, self.dropout,
                                     max_len=max(32, patterns.shape[1]))
        opt = torch.optim.Adam(self.encoder_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        X, S = self._tensor(patterns), torch.as_tensor(descriptors)
        gen = torch.Generator().manual_seed(self.random_state)
        self.loss_history_, deltas = [], []
        self.encoder_.train()
        for _ in tqdm(range(self.epochs), desc="scene encoder (SupCon)", disable=not self.progress):
            perm, total, n = torch.randperm(len(X), generator=gen), 0.0, 0
            for b in range(0, len(X), self.batch_size):
                idx = perm[b:b + self.batch_size]
                if len(idx) < 2:
                    continue
                pos, delta = percentile_positives(S[idx], self.positive_percentile)
                loss = supcon_loss(self.encoder_(X[idx]), pos, self.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(idx), n + len(idx)
                deltas.append(delta)
            self.loss_history_.append(total / max(n, 1))
        self.delta_mean_ = float(np.nanmean(deltas)) if deltas else float("nan")
        crit = descriptors.max(1)
        n_h = max(1, math.ceil(self.hazard_fraction * len(crit)))
        self.hazard_index_ = np.argsort(-crit, kind="stable")[:n_h]
        self.train_embeddings_ = self.embed(patterns)
        self.hazard_embeddings_ = self.train_embeddings_[self.hazard_index_]
        self.train_criticality_ = crit
        return self

    def embed(self, patterns: np.ndarray) -> np.ndarray:
        """Dropout-free embeddings (N, embed_dim)."""
        import torch

        from curation.scene_encoder import torch_threads

        self.encoder_.eval()
        with torch.no_grad(), torch_threads(self.num_threads):
            return self.encoder_(self._tensor(patterns)).numpy().astype(np.float64)

    def mc_embed(self, patterns: np.ndarray, samples: int | None = None) -> np.ndarray:
        """(N, samples, embed_dim) embeddings under MC dropout, pass k seeded with random_state + k."""
        import torch

        from curation.scene_encoder import set_mc_dropout, torch_threads

        samples = samples or self.mc_samples
        x = self._tensor(patterns)
        set_mc_dropout(self.encoder_)
        out = []
        with torch.no_grad(), torch_threads(self.num_threads):
            for k in range(samples):
                torch.manual_seed(self.random_state + 1000 + k)
                out.append(self.encoder_(x).numpy())
        self.encoder_.eval()
        return np.stack(out, 1).astype(np.float64)

    def score(self, patterns: np.ndarray) -> dict:
        """S, R, U, Q and the embeddings Z of the candidates (R over the candidates themselves)."""
        Z = self.embed(patterns)
        S = safety_criticality(Z, self.hazard_embeddings_, self.tau_s)
        R, bw, k = rarity(Z, self.k_rarity)
        U = mc_uncertainty(self.mc_embed(patterns))
        Q, sig = value_score(S, R, U, self.weights)
        return {"Z": Z, "S": S, "R": R, "U": U, "Q": Q, "bandwidth": bw, "k_rarity": k, **sig}


# ----------------------------------------------------------------------------------------------
# the selector


class SemanticSelector(Selector):
    """Top-Q scenes (Inoue & Fukushima; see the module doc for the method and our choices).

    `select(pool, budget, predictions=..., train_ids=..., report_dir=...)`:
    - predictions: the planner's poses per scene (see `resolve_predictions`); None -> CTRV fallback (recorded);
    - train_ids: the labelled set T the encoder learns from (default: the whole pool, our choice for pools
      whose ground truth is all known); with `exclude_train` those scenes are not candidates;
    - report_dir: writes semantic_map.png (embedding map coloured by safety, selected circled) and
      semantic_scores.csv (id, S, R, U, Q, t*, max s).
    Scenes whose logged future is shorter than `num_poses * interval` cannot be scored and are left out
    (recorded as a fallback).
    """

    method = "semantic"
    needs = frozenset({"predictions", "train_ids", "report_dir"})  # the SelectionContext inputs it uses (curation/context.py)

    def __init__(self, horizon: int = 5, num_poses: int = 8, interval: float = 0.5, sigma: float = 1.0, safety_path: str = "plan",
                 weights: Sequence[float] = (1.0, 1.0, 1.0), epochs: int = 100, batch_size: int = 256, lr: float = 1e-3,
                 embed_dim: int = 128, dropout: float = 0.1, temperature: float = 0.07, positive_percentile: float = 10.0,
                 hazard_fraction: float = 0.1, tau_s: float = 0.5, k_rarity: int = 20, mc_samples: int = 10, exclude_train: bool = True,
                 map_method: str = "pca", random_state: int = 0, progress: bool = False):
        self.horizon, self.num_poses, self.interval, self.sigma, self.safety_path = horizon, num_poses, interval, sigma, safety_path
        self.weights, self.epochs, self.batch_size, self.lr = list(weights), epochs, batch_size, lr
        self.embed_dim, self.dropout, self.temperature, self.positive_percentile = embed_dim, dropout, temperature, positive_percentile
        self.hazard_fraction, self.tau_s, self.k_rarity, self.mc_samples = hazard_fraction, tau_s, k_rarity, mc_samples
        self.exclude_train, self.map_method, self.random_state, self.progress = exclude_train, map_method, random_state, progress

    def _check(self) -> None:
        if self.safety_path not in ("plan", "gt"):
            raise SelectionError(f"semantic: safety_path must be 'plan' or 'gt', got {self.safety_path!r}")
        if len(self.weights) != 3 or any(w < 0 for w in self.weights):
            raise SelectionError(f"semantic: weights must be three non-negative numbers (w_S, w_R, w_U), got {self.weights!r}")
        if not 0 < self.positive_percentile < 100:
            raise SelectionError(f"semantic: positive_percentile must be in (0, 100), got {self.positive_percentile!r}")
        if self.num_poses < self.horizon:
            raise SelectionError(f"semantic: num_poses ({self.num_poses}) must be >= horizon ({self.horizon})")

    def _select(self, pool, budget: int, ctx) -> Selection:
        predictions, train_ids, report_dir = ctx.predictions, ctx.train_ids, ctx.report_dir
        self._check()
        if not hasattr(pool, "dataset"):
            raise SelectionError(f"semantic: needs a ScenePool (ego futures and agents per scene), got {type(pool).__name__}")
        scenes, ids = list(pool), pool.ids
        fallbacks, usable, gt = [], [], []
        for i, sc in enumerate(scenes):
            try:
                gt.append(sc.future_trajectory(self.num_poses, self.interval, "ego"))
                usable.append(i)
            except ValueError:
                pass
        if len(usable) < len(scenes):
            fallbacks.append({"what": "short_future", "why": f"{len(scenes) - len(usable)} scenes have less than {self.num_poses * self.interval} s of future",
                              "consequence": "left out of training and selection"})
        if len(usable) < 2:
            raise SelectionError(f"semantic: {len(usable)} scene(s) with a full {self.num_poses * self.interval} s future; need at least 2")
        scenes, ids, gt = [scenes[i] for i in usable], [ids[i] for i in usable], np.stack(gt)
        if predictions is None:
            plans = ctrv_predictions(scenes, self.num_poses, self.interval)
            fallbacks.append({"what": "no_predictions", "why": "no planner predictions given",
                              "consequence": "error patterns from a constant turn-rate and velocity planner"})
        else:
            plans, missing = resolve_predictions(predictions, ids, self.num_poses)
            if missing:
                raise SelectionError(f"semantic: predictions missing for {len(missing)} of {len(ids)} scenes, e.g. {missing[:5]}")
        patterns, t_star, _ = error_patterns(plans, gt, self.horizon)
        desc, dmin = safety_descriptors(scenes, plans if self.safety_path == "plan" else gt, t_star, self.horizon, self.interval,
                                        self.sigma, progress=self.progress)
        pos = {sid: i for i, sid in enumerate(ids)}
        if train_ids is None:
            train = np.arange(len(ids))
        else:
            unknown = [t for t in train_ids if t not in pos]
            if unknown:
                raise SelectionError(f"semantic: {len(unknown)} train id(s) are not usable scenes of the pool, e.g. {unknown[:5]}")
            train = np.array(sorted({pos[t] for t in train_ids}), dtype=np.int64)
        cand = np.setdiff1d(np.arange(len(ids)), train) if (train_ids is not None and self.exclude_train) else np.arange(len(ids))
        n = check_budget(budget, len(cand), "candidate pool")
        scorer = SemanticScorer(self.embed_dim, 128, 2, 4, self.dropout, self.temperature, self.positive_percentile, self.epochs,
                                self.batch_size, self.lr, 0.0, self.hazard_fraction, self.tau_s, self.k_rarity, self.mc_samples,
                                self.weights, self.random_state, self.progress).fit(patterns[train], desc[train])
        res = scorer.score(patterns[cand])
        crit = desc.max(1)
        check = embedding_safety_correlation(res["Z"], crit[cand])
        order = np.argsort(-res["Q"], kind="stable")[:n]
        take = cand[order]
        reasons = [f"Q={res['Q'][o]:.3f} (S={res['S'][o]:.3f}, R={res['R'][o]:.3f}, U={res['U'][o]:.2e}); worst window t*={int(t_star[c])}, "
                   f"max soft collision cost {crit[c]:.3f}" for o, c in zip(order, take)]
        state = {
            "pearson_check": check, "num_train": int(len(train)), "num_candidates": int(len(cand)),
            "hazards": [ids[train[h]] for h in scorer.hazard_index_], "hazard_min_criticality": float(crit[train][scorer.hazard_index_].min()),
            "weights": list(self.weights), "sigma_S": res["sigma_S"], "sigma_R": res["sigma_R"], "sigma_U": res["sigma_U"],
            "rarity_bandwidth": res["bandwidth"], "k_rarity": res["k_rarity"], "positive_delta_mean": scorer.delta_mean_,
            "loss_first": scorer.loss_history_[0] if scorer.loss_history_ else None,
            "loss_last": scorer.loss_history_[-1] if scorer.loss_history_ else None, "input_scale": scorer.input_scale_,
            "mean_min_distance_m": float(np.mean(np.where(np.isfinite(dmin), dmin, np.nan))) if np.isfinite(dmin).any() else None,
        }
        if report_dir is not None:
            report_dir = Path(report_dir)
            report_dir.mkdir(parents=True, exist_ok=True)
            mark = np.isin(cand, take)
            state["map_png"] = str(plot_embedding_map(res["Z"], crit[cand], report_dir / "semantic_map.png", self.map_method, self.random_state,
                                                      title=f"semantic embedding ({self.map_method}); Pearson r = {check['pearson_r']:.2f}", mark=mark))
            state["scores_csv"] = str(_write_scores(report_dir / "semantic_scores.csv", [ids[c] for c in cand], res, t_star[cand], crit[cand]))
        return Selection(
            ids=[ids[c] for c in take], scores=res["Q"][order].tolist(), reasons=reasons, method=self.method, budget=n,
            seed=self.random_state, config=self.get_params(), state=state, fallbacks=fallbacks, pool=pool_info(pool),
            extra={"S": res["S"][order].tolist(), "R": res["R"][order].tolist(), "U": res["U"][order].tolist(),
                   "max_safety": crit[take].tolist()},
        )


def _write_scores(path: Path, ids, res: dict, t_star, crit) -> Path:
    from common.atomic import write_text

    lines = ["id,S,R,U,Q,t_star,max_safety"]
    lines += [f"{i},{s:.6g},{r:.6g},{u:.6g},{q:.6g},{int(t)},{c:.6g}" for i, s, r, u, q, t, c in zip(ids, res["S"], res["R"], res["U"], res["Q"], t_star, crit)]
    write_text(path, "\n".join(lines) + "\n")
    return path
