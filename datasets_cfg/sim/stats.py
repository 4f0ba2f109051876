"""How different are two sets of scenes? Scene features and distribution distances (MMD, sliced Wasserstein).

Used to show that the synthetic pool (perturbed simulator settings) differs measurably from the real pool
(default settings), against the yardstick of two halves of the real pool (split by log, so scenes of one
episode never sit on both sides).
"""
from __future__ import annotations

import json

import numpy as np

from datasets_cfg.sim.annotate import GENERAL_RADIUS_M, current_objects

FEATURES = ("ego_speed_mean", "ego_speed_std", "ego_accel_abs_max", "ego_accel_lat_abs_max", "ego_yaw_rate_abs_mean",
            "agents_near", "agent_speed_mean", "min_gap_m", "min_ttc_s", "image_mean", "image_std")


def scene_features(row: dict) -> np.ndarray:
    """Feature vector (in `FEATURES` order) of one scene row; gap and TTC are capped (30 m, 10 s)."""
    e = row["ego"]
    meta = json.loads(row["meta"])
    near = [o for o in current_objects(row) if o["category"] == "vehicle" and o["distance"] < GENERAL_RADIUS_M]
    safety = meta.get("safety", {})
    stats = meta.get("image_stats", {})
    return np.array([
        np.mean(e["speed"]), np.std(e["speed"]), np.max(np.abs(e["accel"])), np.max(np.abs(e["accel_lat"])),
        np.mean(np.abs(e["yaw_rate"])), len(near), np.mean([o["speed"] for o in near]) if near else 0.0,
        min(safety.get("min_gap_m", 30.0), 30.0), min(safety.get("min_ttc_s", 10.0), 10.0),
        stats.get("mean", 0.0), stats.get("std", 0.0),
    ], dtype=np.float64)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    """Median pairwise Euclidean distance (the usual RBF bandwidth heuristic)."""
    d = np.sqrt(_sq_dists(x, x))
    iu = np.triu_indices(len(x), 1)
    med = float(np.median(d[iu])) if len(iu[0]) else 1.0
    return med if med > 0 else 1.0


def mmd(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    """Unbiased squared MMD with an RBF kernel exp(-|x-y|^2 / (2 bw^2)), returned as sqrt(max(MMD^2, 0))."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"mmd needs at least 2 samples per set, got {len(a)} and {len(b)}")
    g = 1.0 / (2.0 * bandwidth**2)
    kaa, kbb, kab = np.exp(-g * _sq_dists(a, a)), np.exp(-g * _sq_dists(b, b)), np.exp(-g * _sq_dists(a, b))
    n, m = len(a), len(b)
    mmd2 = (kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2.0 * kab.mean()
    return float(np.sqrt(max(mmd2, 0.0)))


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_projections: int = 256, random_state: int = 0) -> float:
    """Sliced 2-Wasserstein distance: mean over random directions of the 1-D W2 between projections."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(random_state)
    dirs = rng.normal(size=(n_projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    q = np.linspace(0.0, 1.0, 101)
    pa = np.quantile(a @ dirs.T, q, axis=0)
    pb = np.quantile(b @ dirs.T, q, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def distribution_distance(a: np.ndarray, b: np.ndarray, method: str = "mmd", scale: tuple | None = None,
                          bandwidth: float | None = None, random_state: int = 0) -> float:
    """Distance between two feature sets (rows = scenes). Features are standardised with `scale` = (mean, std)
    (default: the pooled statistics of a and b). method: "mmd" (RBF, median-heuristic bandwidth) or "swd"."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be 2-D with the same number of columns, got {a.shape} and {b.shape}")
    if scale is None:
        both = np.concatenate([a, b])
        scale = (both.mean(0), both.std(0))
    mu, sd = (np.asarray(s, float) for s in scale)
    sd = np.where(sd > 1e-12, sd, 1.0)
    a, b = (a - mu) / sd, (b - mu) / sd
    if method == "mmd":
        return mmd(a, b, bandwidth or median_bandwidth(np.concatenate([a, b])))
    if method == "swd":
        return sliced_wasserstein(a, b, random_state=random_state)
    raise ValueError(f"method must be 'mmd' or 'swd', got {method!r}")


def env_matched(feats: np.ndarray, envs: np.ndarray, is_real: np.ndarray) -> np.ndarray:
    """Features minus the mean of the *real* scenes of the same environment (pooled real mean if it has none).

    Environments differ far more than sources do (an intersection is slower than a highway), so comparing
    sources with different environment mixes would mostly measure the mix; this removes it.
    """
    out = feats.copy()
    base = feats[is_real].mean(0) if is_real.any() else feats.mean(0)
    for env in np.unique(envs):
        m = envs == env
        ref = feats[m & is_real]
        out[m] -= ref.mean(0) if len(ref) else base
    return out


def real_vs_synthetic(rows: list[dict], repeats: int = 20, random_state: int = 0, match_env: bool = True) -> dict | None:
    """Distances real-vs-synthetic and real-vs-real (random halves of the real logs), same scale and bandwidth.

    With `match_env`, features are first centred per environment on its real scenes (`env_matched`).
    """
    feats = np.stack([scene_features(r) for r in rows]) if rows else np.zeros((0, len(FEATURES)))
    src = np.array([r["source"] for r in rows])
    logs = np.array([json.loads(r["meta"])["log_name"] for r in rows])
    raw_real, raw_syn = feats[src == "real"], feats[src == "synthetic"]
    if len(raw_real) < 2 or len(raw_syn) < 2:
        return None
    if match_env:
        feats = env_matched(feats, np.array([r["location"] for r in rows]), src == "real")
    real, syn = feats[src == "real"], feats[src == "synthetic"]
    mu, sd = feats.mean(0), feats.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (feats - mu) / sd
    bw = median_bandwidth(z)
    out = {"features": list(FEATURES), "env_matched": match_env, "n_real": int(len(real)), "n_synthetic": int(len(syn)), "bandwidth": bw}
    for method in ("mmd", "swd"):
        out[f"{method}_real_vs_synthetic"] = distribution_distance(real, syn, method, (mu, sd), bw, random_state)
    real_logs = np.unique(logs[src == "real"])
    rng = np.random.default_rng(random_state)
    for method in ("mmd", "swd"):
        vals = []
        for _ in range(repeats if len(real_logs) >= 4 else 0):
            half = set(rng.permutation(real_logs)[: len(real_logs) // 2])
            in_a = np.array([lg in half for lg in logs[src == "real"]])
            if in_a.sum() >= 2 and (~in_a).sum() >= 2:
                vals.append(distribution_distance(real[in_a], real[~in_a], method, (mu, sd), bw, random_state))
        out[f"{method}_real_vs_real_split"] = float(np.mean(vals)) if vals else None
    out["feature_means"] = {"real": dict(zip(FEATURES, raw_real.mean(0).round(4).tolist())),
                            "synthetic": dict(zip(FEATURES, raw_syn.mean(0).round(4).tolist()))}
    return out
