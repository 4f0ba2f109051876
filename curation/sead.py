"""SEAD ("Active Learning from Scene Embeddings for End-to-End Autonomous Driving", arXiv:2503.11062;
Sec. 3.2, 3.3, Alg. 1; our choices: docs/methods/sead.md).

Units. A clip is a log/episode: scenes grouped by meta "log_name", ordered by meta "timestamp_s"; a
scene is one frame of its clip. The budget counts scenes (the ids of the Selection). OURS: if no scene
has a "log_name", each scene is its own clip whose frames are its own history frames (0..current_index);
such a clip is taken whole (no key frames).

Round 0 — initial set (Sec. 3.2, Alg. 1 lines 4-5): 4 static strata (day/night x sunny/rainy, majority
over the clip's frames; OURS: unknown lighting counts as day and unknown weather as sunny, counted in the
manifest) x 3 dynamic strata from two clip statistics: the std of the ego's acceleration (the paper's
"y-axis acceleration" = `accel_lat` by default, `acc_field` to change) and the cumulative |yaw change|.
"High" = the top λ = 1/3 of clips by rank; B = high on both, N = high on neither, S = the rest (the
paper's Eq. 1 prints S = D − (B ∩ N), read as D − (B ∪ N)). Quotas n_xy = n_0 · |cell| / Σ|cell| in
scenes (largest remainder); within a cell, clips are taken whole in a seeded random order and the last
one contributes its first frames in time (OURS: keeps the budget exact).

Rounds 1.. (Sec. 3.3, Alg. 1 lines 8-13): the model retrained from scratch on all selected scenes (a
`PilotTrainer`) — if it also provides per-frame agent/map features and detections (`SetFeatureModel`),
those are used, else ground-truth-derived ones (`ground_truth_sets`: agents and lane-centreline points
in each frame's ego frame). Elements are standardised and reduced by PCA (`agent_dims`, `map_dims`),
then FS between consecutive frames = EMD(F_t, F_{t-1}) (uniform weights, Euclidean ground distance, POT
`ot.emd2`; OURS: an empty set counts as one element at the origin of the reduced space), and
FS_s = Σ_t (FS_a,t + FS_m,t). `fs_mode="mean"` uses the distance between the sets' mean elements (the
paper's "we reduce EMD computation complexity by averaging the elements"; vectorised, used at 1M clips).
Clips with frames not yet taken are ranked by FS_s (descending; OURS `revisit_clips=True`: the budget
counts scenes, so a partly taken clip stays a candidate for its other frames; False = the paper's rule,
a clip once touched is never ranked again); in each, key frames are frames whose nearest
detection with confidence > `conf_threshold` (0.5) is within `distance_threshold` (5 m) of the ego; the
longest run of consecutive untaken key frames is taken (ties: the earliest; OURS). Clips without key frames give
nothing; a run longer than the remaining round budget contributes its first frames. If the ranking runs
out, the round is filled with the other frames of the ranked clips in FS order (a recorded fallback).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from curation.features import agent_set, map_set
from curation.selection import Selection, SelectionError, Selector, check_budget, pool_info, run_pilot

STATIC = ("DS", "DR", "NS", "NR")
DYNAMIC = ("B", "S", "N")
STRATA = tuple(f"{s}-{d}" for s in STATIC for d in DYNAMIC)


# ----------------------------------------------------------------------------------------------
# per-frame sets


@dataclass
class FrameSets:
    """Per-frame sets for FS and key frames (lists aligned with the frames asked for)."""

    agents: list[np.ndarray]  # (n_i, d_a) agent features
    map: list[np.ndarray]  # (m_i, d_m) map features
    det_xy: list[np.ndarray]  # (k_i, 2) detected agent positions in the frame's ego frame (m)
    det_conf: list[np.ndarray]  # (k_i,) detection confidences in [0, 1]
    source: dict | None = None  # where each part came from ({"agents": ..., "map": ..., "detections": ...}); None: the model


@runtime_checkable
class SetFeatureModel(Protocol):
    """Optional: a model that extracts per-frame agent/map features and detections (e.g. from BEV queries)."""

    def set_features(self, ids: Sequence[str], frames: Sequence[int]) -> FrameSets:
        """Sets of frame `frames[i]` of scene `ids[i]`, one entry per frame asked for."""


def ground_truth_sets(pool, frames: Sequence[tuple[int, int]], categories: Sequence[str] | None = None,
                      map_radius: float = 50.0, map_spacing: float = 5.0) -> FrameSets:
    """Sets from ground truth for frames (pool position, frame index): agents (`AGENT_SET_NAMES`), lane
    points (`MAP_SET_NAMES`) and detections = the agents themselves with confidence 1."""
    agents, maps, xy, conf = [], [], [], []
    cache: dict[int, object] = {}
    for p, t in frames:
        scene = cache.get(p) or cache.setdefault(p, pool[int(p)])
        a = agent_set(scene, t, categories)
        agents.append(a)
        maps.append(map_set(scene, t, map_radius, map_spacing))
        xy.append(a[:, :2])
        conf.append(np.ones(len(a)))
        if len(cache) > 64:
            cache.clear()
    return FrameSets(agents, maps, xy, conf)


# ----------------------------------------------------------------------------------------------
# EMD and feature shift


def emd(A: np.ndarray, B: np.ndarray) -> float:
    """Earth mover's distance between two point sets with uniform weights and Euclidean ground distance."""
    import ot

    A, B = _nonempty(A, B), _nonempty(B, A)
    if len(A) == 1 and len(B) == 1:
        return float(np.linalg.norm(A[0] - B[0]))
    M = ot.dist(A, B, metric="euclidean")
    return float(ot.emd2(np.full(len(A), 1.0 / len(A)), np.full(len(B), 1.0 / len(B)), M))


def _nonempty(S: np.ndarray, other: np.ndarray) -> np.ndarray:
    S = np.asarray(S, dtype=np.float64)
    if len(S) == 0:  # OURS: an empty set is one element at the origin of the (centred) reduced space
        return np.zeros((1, np.shape(other)[1] if np.ndim(other) == 2 and np.shape(other)[1] else 1))
    return S


class SetReducer:
    """Standardise set elements, then PCA to `dims` components (fitted on a subsample of all elements)."""

    def __init__(self, dims: int, max_fit: int = 200_000, random_state: int = 0):
        self.dims = dims
        self.max_fit = max_fit
        self.random_state = random_state

    def fit(self, sets: Sequence[np.ndarray]) -> "SetReducer":
        nonempty = [s for s in sets if len(s)]
        X = np.concatenate(nonempty) if nonempty else np.zeros((1, 1))
        if len(X) > self.max_fit:
            X = X[np.random.default_rng(self.random_state).choice(len(X), self.max_fit, replace=False)]
        self.mean_ = X.mean(0)
        sd = X.std(0)
        self.scale_ = np.where(sd > 0, sd, 1.0)
        Z = (X - self.mean_) / self.scale_
        Z = Z - Z.mean(0)
        w, v = np.linalg.eigh(Z.T @ Z)  # principal axes from the d x d scatter matrix
        order = np.argsort(w)[::-1]
        var, vt = np.maximum(w[order], 0.0), v[:, order].T
        k = int(min(self.dims, vt.shape[0]))
        self.components_ = vt[:k]
        self.explained_variance_ratio_ = (var[:k] / var.sum()).tolist() if var.sum() > 0 else [0.0] * k
        return self

    def transform(self, S: np.ndarray) -> np.ndarray:
        if len(S) == 0:
            return np.zeros((0, len(self.components_)))
        return ((np.asarray(S, float) - self.mean_) / self.scale_) @ self.components_.T


def clip_feature_shift(agents: Sequence[np.ndarray], maps: Sequence[np.ndarray], clips: Sequence[np.ndarray],
                       mode: str = "emd", progress: bool = False) -> np.ndarray:
    """FS_s per clip = Σ over consecutive frames of EMD(agent sets) + EMD(map sets) (reduced sets given).

    `clips`: per clip, indices into the frame lists in time order. `mode`: "emd" or "mean" (see module doc).
    """
    if mode not in ("emd", "mean"):
        raise SelectionError(f"sead: fs_mode must be 'emd' or 'mean', got {mode!r}")
    if mode == "mean":
        dim = lambda sets: max([s.shape[1] for s in sets if len(s)] + [1])  # noqa: E731
        ma = np.stack([s.mean(0) if len(s) else np.zeros(dim(agents)) for s in agents]) if len(agents) else np.zeros((0, 1))
        mm = np.stack([s.mean(0) if len(s) else np.zeros(dim(maps)) for s in maps]) if len(maps) else np.zeros((0, 1))
        return shift_from_means(np.concatenate([ma, mm], 1) if len(ma) else ma, clips, split=ma.shape[1])
    out = np.zeros(len(clips))
    for c, fr in enumerate(tqdm(clips, desc="SEAD feature shift", disable=not progress)):
        out[c] = sum(emd(agents[fr[t]], agents[fr[t - 1]]) + emd(maps[fr[t]], maps[fr[t - 1]]) for t in range(1, len(fr)))
    return out


def shift_from_means(M: np.ndarray, clips: Sequence[np.ndarray] | np.ndarray, split: int | None = None) -> np.ndarray:
    """Vectorised "mean" FS: per clip Σ_t ||a_t - a_{t-1}|| + ||m_t - m_{t-1}|| from per-frame mean rows
    M = [agent mean | map mean] (columns split at `split`). `clips` as a list of frame-index arrays, or an
    offsets array (n_clips + 1,) when frames are stored clip by clip in time order."""
    if isinstance(clips, np.ndarray) and clips.ndim == 1 and clips.dtype.kind in "iu":
        offsets, rows = clips, None
    else:
        lens = np.array([len(c) for c in clips], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        rows = np.concatenate([np.asarray(c, np.int64) for c in clips]) if len(clips) else np.zeros(0, np.int64)
    F = M if rows is None else M[rows]
    split = F.shape[1] if split is None else split
    d = np.diff(F, axis=0)
    step = np.linalg.norm(d[:, :split], axis=1) + (np.linalg.norm(d[:, split:], axis=1) if split < F.shape[1] else 0.0)
    valid = np.ones(len(step), bool)  # a step from the last frame of one clip to the next clip's first is not a step
    inner = offsets[1:-1] - 1
    valid[inner[(inner >= 0) & (inner < len(step))]] = False
    step = np.where(valid, step, 0.0)
    csum = np.concatenate([[0.0], np.cumsum(step)])
    lo, hi = offsets[:-1], np.maximum(offsets[1:] - 1, offsets[:-1])
    return csum[hi] - csum[lo]


def longest_run(flags: Sequence[bool]) -> tuple[int, int]:
    """(start, length) of the longest run of True (the earliest among equals); (0, 0) if none."""
    best, cur_start, cur = (0, 0), 0, 0
    for i, f in enumerate(flags):
        if f:
            if cur == 0:
                cur_start = i
            cur += 1
            if cur > best[1]:
                best = (cur_start, cur)
        else:
            cur = 0
    return best


def key_frame_flags(det_xy: Sequence[np.ndarray], det_conf: Sequence[np.ndarray], conf_threshold: float = 0.5,
                    distance_threshold: float = 5.0) -> np.ndarray:
    """Eq. 4: a frame is a key frame if its nearest detection with confidence > threshold is closer than
    `distance_threshold` metres to the ego (the origin of the frame's ego frame)."""
    out = np.zeros(len(det_xy), bool)
    for i, (xy, c) in enumerate(zip(det_xy, det_conf)):
        xy = np.asarray(xy, float).reshape(-1, 2)
        keep = np.asarray(c, float) > conf_threshold
        if keep.any():
            out[i] = float(np.hypot(xy[keep, 0], xy[keep, 1]).min()) < distance_threshold
    return out


# ----------------------------------------------------------------------------------------------
# strata


def rank_high(values: np.ndarray, lam: float) -> np.ndarray:
    """The top round(λ·n) values by rank (ties broken by position) are "high"."""
    n_high = int(round(lam * len(values)))
    high = np.zeros(len(values), bool)
    if n_high:
        high[np.argsort(-np.asarray(values, float), kind="stable")[:n_high]] = True
    return high


def dynamic_strata(acc_std: np.ndarray, cum_yaw: np.ndarray, lam: float = 1 / 3) -> np.ndarray:
    """Per clip "B" (high acc-std AND high cumulative yaw), "N" (neither) or "S" (the rest)."""
    a, y = rank_high(acc_std, lam), rank_high(cum_yaw, lam)
    return np.where(a & y, "B", np.where(~a & ~y, "N", "S"))


def proportional_quotas(sizes: np.ndarray, total: int) -> np.ndarray:
    """total · size / Σ size, rounded by largest remainder (ties to the lower index)."""
    sizes = np.asarray(sizes, float)
    if total == 0 or sizes.sum() == 0:
        return np.zeros(len(sizes), np.int64)
    share = sizes / sizes.sum() * total
    q = np.floor(share).astype(np.int64)
    for i in np.lexsort((np.arange(len(share)), -(share - q)))[: total - int(q.sum())]:
        q[i] += 1
    return q


# ----------------------------------------------------------------------------------------------
# the selector


class SEAD(Selector):
    """Initial stratified selection, then feature-shift rounds with key frames; see the module docstring."""

    method = "sead"
    needs = frozenset({"pilot", "exclude"})  # the SelectionContext inputs it uses (curation/context.py)

    def __init__(self, n_rounds: int = 3, initial_fraction: float | None = None, lam: float = 1 / 3, acc_field: str = "accel_lat",
                 clip_key: str = "log_name", time_key: str = "timestamp_s", fs_mode: str = "emd", agent_dims: int = 4,
                 map_dims: int = 2, map_radius: float = 50.0, map_spacing: float = 5.0, agent_categories: Sequence[str] | None = None,
                 key_frames: bool = True, conf_threshold: float = 0.5, distance_threshold: float = 5.0,
                 revisit_clips: bool = True, unknown_static: str = "assume", final_fit: bool = True, progress: bool = True,
                 random_state: int = 0):
        self.n_rounds = n_rounds
        self.initial_fraction = initial_fraction
        self.lam = lam
        self.acc_field = acc_field
        self.clip_key = clip_key
        self.time_key = time_key
        self.fs_mode = fs_mode
        self.agent_dims = agent_dims
        self.map_dims = map_dims
        self.map_radius = map_radius
        self.map_spacing = map_spacing
        self.agent_categories = agent_categories
        self.key_frames = key_frames
        self.conf_threshold = conf_threshold
        self.distance_threshold = distance_threshold
        self.revisit_clips = revisit_clips
        self.unknown_static = unknown_static
        self.final_fit = final_fit
        self.progress = progress
        self.random_state = random_state

    # ------------------------------------------------------------------------------------------
    def clips(self, pool, cand: np.ndarray, fallbacks: list) -> tuple[list[str], list[list[tuple[int, int]]], bool]:
        """(clip names, per clip its frames as (pool position, frame index) in time order, log_based)."""
        metas = pool.column("meta")
        ci = pool.column("current_index")
        logs: dict[str, list[tuple[float, int]]] = {}
        loose = []
        for p in cand:
            m = json.loads(metas[p])
            if self.clip_key in m:
                t = m.get(self.time_key)
                if t is None or not isinstance(t, (int, float)) or not math.isfinite(t):
                    raise SelectionError(f"sead: scene {pool.ids[p]!r}: field meta.{self.time_key}: expected a finite time in seconds (needed to order clip {m[self.clip_key]!r}), got {t!r}")
                logs.setdefault(str(m[self.clip_key]), []).append((float(t), int(p)))
            else:
                loose.append(int(p))
        if not logs:
            fallbacks.append({"what": "no_clips", "why": f"no scene has meta.{self.clip_key}",
                              "consequence": "each scene is a clip of its own history frames, taken whole"})
            return [pool.ids[p] for p in loose], [[(p, t) for t in range(int(ci[p]) + 1)] for p in loose], False
        names, frames = [], []
        for name in sorted(logs):
            rows = sorted(logs[name])
            ts = [t for t, _ in rows]
            if len(set(ts)) != len(ts):
                raise SelectionError(f"sead: clip {name!r}: two scenes share meta.{self.time_key} = {ts[[ts.count(t) > 1 for t in ts].index(True)]}")
            names.append(name)
            frames.append([(p, int(ci[p])) for _, p in rows])
        if loose:
            fallbacks.append({"what": "scenes_without_clip", "why": f"{len(loose)} scenes have no meta.{self.clip_key}",
                              "consequence": "each is a one-frame clip (feature shift 0)"})
            names += [pool.ids[p] for p in loose]
            frames += [[(p, int(ci[p]))] for p in loose]
        return names, frames, True

    def _clip_stats(self, pool, frames, log_based):
        egos = pool.column("ego")
        weather, lighting = pool.column("weather"), pool.column("lighting")
        acc, yaw, static, unknown = [], [], [], 0
        for fr in frames:
            if log_based and len(fr) > 1:
                series_acc = [egos[p][self.acc_field][t] for p, t in fr]
                heading = [egos[p]["heading"][t] for p, t in fr]
            else:
                p = fr[0][0]
                series_acc, heading = egos[p][self.acc_field], egos[p]["heading"]
            acc.append(float(np.std(series_acc)) if len(series_acc) else 0.0)
            dh = np.diff(np.unwrap(np.asarray(heading, float))) if len(heading) > 1 else np.zeros(0)
            yaw.append(float(np.abs(dh).sum()))
            ps = sorted({p for p, _ in fr})
            light = _majority([lighting[p] for p in ps])
            wet = _majority([weather[p] for p in ps])
            if light == "" or wet == "":
                if self.unknown_static == "error":
                    raise SelectionError(f"sead: scene {pool.ids[ps[0]]!r}: fields lighting/weather unknown (unknown_static='error')")
                unknown += 1
            static.append(("N" if light == "night" else "D") + ("R" if wet == "rainy" else "S"))
        dyn = dynamic_strata(np.asarray(acc), np.asarray(yaw), self.lam)
        return np.asarray(acc), np.asarray(yaw), np.array([f"{s}-{d}" for s, d in zip(static, dyn)]), unknown

    # ------------------------------------------------------------------------------------------
    def _select(self, pool, budget: int, ctx) -> Selection:
        pilot, exclude = ctx.pilot, ctx.exclude
        if self.fs_mode not in ("emd", "mean"):
            raise SelectionError(f"sead: fs_mode must be 'emd' or 'mean', got {self.fs_mode!r}")
        if self.n_rounds < 1:
            raise SelectionError(f"sead: n_rounds must be >= 1, got {self.n_rounds}")
        if not (isinstance(self.distance_threshold, (int, float)) and math.isfinite(self.distance_threshold) and self.distance_threshold > 0):
            raise SelectionError(f"sead: distance_threshold (the key-frame distance, m) must be a positive number, got {self.distance_threshold!r}")
        rng = np.random.default_rng(self.random_state)
        all_ids = pool.ids
        excl = set(exclude)
        cand = np.array([i for i, s in enumerate(all_ids) if s not in excl], np.int64)
        budget = check_budget(budget, len(cand), "pool (minus excluded pilot evaluation scenes)" if excl else "pool")
        fallbacks: list[dict] = []
        names, frames, log_based = self.clips(pool, cand, fallbacks)
        units = [list(dict.fromkeys(p for p, _ in fr)) for fr in frames]  # selectable scenes per clip, in time order
        acc, yaw, strata, unknown = self._clip_stats(pool, frames, log_based)
        if unknown:
            fallbacks.append({"what": "unknown_static", "why": f"{unknown} clips have unknown lighting or weather", "consequence": "counted as day / sunny"})

        frac = self.initial_fraction if self.initial_fraction is not None else 1.0 / self.n_rounds
        n0 = int(round(budget * frac)) if self.n_rounds > 1 else budget
        rest = proportional_quotas(np.ones(self.n_rounds - 1), budget - n0) if self.n_rounds > 1 else np.zeros(0, np.int64)
        round_budgets = [n0, *rest.tolist()]

        chosen: list[int] = []
        rows: list[tuple[float, str, int, str, str]] = []  # score, reason, round, clip, stratum
        used_clip = np.zeros(len(frames), bool)
        taken_from: dict[int, set[int]] = {}
        init_state = self._initial(units, strata, round_budgets[0], rng, chosen, rows, names, used_clip, taken_from)
        rounds_state = [init_state]
        sets_cache: dict = {}
        for r in range(1, self.n_rounds):
            metrics = run_pilot(pilot, [all_ids[p] for p in chosen], f"SEAD round {r} training") if pilot is not None else None
            rs = self._incremental(r, pool, pilot, frames, units, names, strata, round_budgets[r], chosen, rows, used_clip,
                                   taken_from, fallbacks, sets_cache)
            rs["pilot_metrics_before"] = metrics
            rounds_state.append(rs)
        final = run_pilot(pilot, [all_ids[p] for p in chosen], "SEAD final training") if pilot is not None and self.final_fit else None

        state = {
            "clips": {"count": len(frames), "log_based": log_based, "frames": int(sum(len(u) for u in units))},
            "strata": {s: {"clips": int((strata == s).sum()), "scenes": int(sum(len(units[c]) for c in np.flatnonzero(strata == s)))} for s in STRATA},
            "dynamic_thresholds": {"lam": self.lam, "acc_field": self.acc_field,
                                   "acc_std_high_min": _min_high(acc, self.lam), "cum_yaw_high_min": _min_high(yaw, self.lam)},
            "round_budgets": round_budgets, "rounds": rounds_state, "final_pilot_metrics": final,
            "feature_source": sets_cache.get("source", "not used"), "fs_mode": self.fs_mode,
        }
        if "explained" in sets_cache:
            state["pca_explained_variance"] = sets_cache["explained"]
        return Selection(
            ids=[all_ids[p] for p in chosen], scores=[r[0] for r in rows], reasons=[r[1] for r in rows], method=self.method,
            budget=budget, seed=self.random_state, config=self.get_params(), state=state, fallbacks=fallbacks,
            extra={"round": [r[2] for r in rows], "clip": [r[3] for r in rows], "stratum": [r[4] for r in rows]},
            pool=pool_info(pool) | {"excluded": len(excl)},
        )

    # ------------------------------------------------------------------------------------------
    def _initial(self, units, strata, n0, rng, chosen, rows, names, used_clip, taken_from) -> dict:
        sizes = np.array([sum(len(units[c]) for c in np.flatnonzero(strata == s)) for s in STRATA])
        quotas = proportional_quotas(sizes, n0)
        taken = {}
        for s, q in zip(STRATA, quotas):
            cells = np.flatnonzero(strata == s)
            got = 0
            for c in rng.permutation(cells):
                if got >= q:
                    break
                part = units[c][: q - got]
                self._take(c, part, float("nan"), f"initial: stratum {s}, random proportional ({q} of {n0})", 0, names, s, chosen, rows, used_clip, taken_from)
                got += len(part)
            taken[s] = got
        return {"round": 0, "budget": n0, "quotas": dict(zip(STRATA, quotas.tolist())), "taken": taken}

    def _take(self, c, part, score, reason, rnd, names, stratum, chosen, rows, used_clip, taken_from):
        for p in part:
            chosen.append(p)
            rows.append((score, reason, rnd, names[c], stratum))
        used_clip[c] = True
        taken_from.setdefault(c, set()).update(part)

    def _sets(self, pool, pilot, frames, cache, fallbacks):
        """Reduced agent/map sets and detections for every frame of every clip (from the model if it can)."""
        flat = [f for fr in frames for f in fr]
        if pilot is not None and isinstance(pilot, SetFeatureModel):
            ids = pool.ids
            fs = pilot.set_features([ids[p] for p, _ in flat], [t for _, t in flat])
            cache["source"] = f"model ({type(pilot).__name__}.set_features)"
            parts = {k: v for k, v in (fs.source or {}).items() if not str(v).startswith("model")}
            if parts:  # a model that supplies only some parts: the others are named, once
                cache["source"] += "; " + "; ".join(f"{k}: {v}" for k, v in parts.items())
                if not cache.get("partial_recorded"):
                    fallbacks.append({"what": "feature_source_partial", "why": f"{type(pilot).__name__}.set_features gives "
                                      f"{', '.join(parts)} from ground truth", "consequence": "; ".join(f"{k}: {v}" for k, v in parts.items())})
                    cache["partial_recorded"] = True
        else:
            if pilot is not None and not cache.get("fallback_recorded"):  # SEAD's FS is meant to use the trained model
                fallbacks.append({"what": "feature_source", "why": f"the pilot ({type(pilot).__name__}) has no set_features",
                                  "consequence": "feature shift and key frames on ground-truth sets (agents, lane centrelines)"})
                cache["fallback_recorded"] = True
            if "gt" not in cache:
                cache["gt"] = ground_truth_sets(pool, flat, self.agent_categories, self.map_radius, self.map_spacing)
            fs = cache["gt"]
            cache["source"] = "ground truth (agents and lane centrelines)"
        if not (len(fs.agents) == len(fs.map) == len(fs.det_xy) == len(fs.det_conf) == len(flat)):
            raise SelectionError(f"sead: set features for {len(flat)} frames expected, got agents {len(fs.agents)}, map {len(fs.map)}, detections {len(fs.det_xy)}")
        ra = SetReducer(self.agent_dims, random_state=self.random_state).fit(fs.agents)
        rm = SetReducer(self.map_dims, random_state=self.random_state).fit(fs.map)
        cache["explained"] = {"agents": ra.explained_variance_ratio_, "map": rm.explained_variance_ratio_}
        return [ra.transform(s) for s in fs.agents], [rm.transform(s) for s in fs.map], fs

    def _incremental(self, r, pool, pilot, frames, units, names, strata, nb, chosen, rows, used_clip, taken_from, fallbacks, cache) -> dict:
        agents, maps, fs = self._sets(pool, pilot, frames, cache, fallbacks)
        offsets = np.concatenate([[0], np.cumsum([len(fr) for fr in frames])])
        taken_set = set(chosen)
        open_clip = np.array([any(p not in taken_set for p in u) for u in units], bool)
        cands = np.flatnonzero(open_clip if self.revisit_clips else (~used_clip & open_clip))
        shift = clip_feature_shift(agents, maps, [np.arange(offsets[c], offsets[c + 1]) for c in cands], self.fs_mode, self.progress)
        order = cands[np.argsort(-shift, kind="stable")]
        fs_of = dict(zip(cands.tolist(), shift.tolist()))
        got, no_key, ranked_used = 0, 0, []
        for rank, c in enumerate(order):
            if got >= nb:
                break
            fr = frames[c]
            multi = len(units[c]) > 1
            if self.key_frames and multi:
                sl = slice(offsets[c], offsets[c + 1])
                flags = key_frame_flags(fs.det_xy[sl], fs.det_conf[sl], self.conf_threshold, self.distance_threshold)
                flags &= np.array([p not in taken_set for p, _ in fr])  # taken frames break a run
                start, length = longest_run(flags)
                if length == 0:
                    no_key += 1
                    continue
                part = [fr[i][0] for i in range(start, start + length)][: nb - got]
                why = f"round {r}: clip FS {fs_of[c]:.4g} (rank {rank + 1}), key frames {start}-{start + length - 1}"
            else:
                part = [p for p in units[c] if p not in taken_set][: nb - got]
                why = f"round {r}: clip FS {fs_of[c]:.4g} (rank {rank + 1}), whole clip"
            self._take(c, part, fs_of[c], why, r, names, strata[c], chosen, rows, used_clip, taken_from)
            taken_set.update(part)
            ranked_used.append(int(c))
            got += len(part)
        filled = 0
        if got < nb:  # fallback: other frames of clips in FS order, then of earlier-used clips
            ranked = set(order.tolist())
            for c in list(order) + [c for c in range(len(frames)) if c not in ranked]:
                if got >= nb:
                    break
                for p in units[c]:
                    if got >= nb:
                        break
                    if p not in taken_set:
                        self._take(c, [p], fs_of.get(int(c), float("nan")), f"round {r}: fill (non-key frame of clip, FS order)", r, names, strata[c], chosen, rows, used_clip, taken_from)
                        taken_set.add(p)
                        got += 1
                        filled += 1
            fallbacks.append({"what": "round_fill", "round": r, "why": f"key-frame runs of all {len(order)} remaining clips gave {got - filled} of {nb} scenes",
                              "consequence": f"{filled} non-key frames added in FS order"})
        return {"round": r, "budget": nb, "taken": got, "clips_ranked": int(len(cands)), "clips_used": len(ranked_used),
                "clips_without_key_frames": no_key, "filled_non_key": filled,
                "top_fs": [float(fs_of[c]) for c in order[:5]]}


def _majority(values: list[str]) -> str:
    vals, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    known = vals != ""
    if known.any():
        vals, counts = vals[known], counts[known]
    return str(vals[np.argmax(counts)]) if len(vals) else ""


def _min_high(values: np.ndarray, lam: float):
    high = rank_high(values, lam)
    return float(values[high].min()) if high.any() else None
