"""Per-scene features for selection: metadata encodings, ego dynamics, agent/map sets, planner inputs, images.

Every function takes a pool (`datasets_cfg.schema.ScenePool`, or an `ArrayPool` of precomputed columns)
and returns numpy arrays in pool order together with feature names. Non-finite values raise
`FeatureError` naming the scene id and the feature. `cached` stores a feature matrix as a `.npy` file
next to the pool (keyed by a hash of the pool ids, the feature name and its config) and `as_column`
stores it as a pool column (`ScenePool.with_column`).

Frames: "ego" = the rear-axle frame of the frame in question (+x forward, +y left), as in the schema.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common.atomic import atomic_path, write_json
from common.errors import MoseError
from common.geometry import global_to_local, rotate_vectors, wrap_angle
from datasets_cfg.schema import Scene

META_KEYS = ("weather", "lighting", "location", "command", "source", "dataset")
DYNAMICS_NAMES = ("speed_mean", "speed_std", "accel_std", "accel_lat_std", "cum_abs_yaw", "accel_lat_abs_max")
AGENT_SET_NAMES = ("x", "y", "vx", "vy", "cos_heading", "sin_heading", "length", "width")
MAP_SET_NAMES = ("x", "y", "cos_direction", "sin_direction")


class FeatureError(MoseError, ValueError):
    """A feature could not be computed or is not finite; the message names the scene and the feature."""


class ArrayPool:
    """A pool of precomputed per-scene columns (ids + arrays), for selection without decoding scenes.

    Used for feature tables and pools too large to hold as `ScenePool` rows (e.g. the 1M-scene benchmark).
    """

    def __init__(self, ids: Sequence[str], columns: dict[str, Sequence] | None = None, root: str | os.PathLike | None = None):
        self._ids = list(ids)
        self.columns = {k: v for k, v in (columns or {}).items()}
        for k, v in self.columns.items():
            if len(v) != len(self._ids):
                raise FeatureError(f"ArrayPool: column {k!r} has {len(v)} values for {len(self._ids)} ids")
        self.root = Path(root) if root is not None else None

    @property
    def ids(self) -> list[str]:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def column(self, name: str):
        if name not in self.columns:
            raise KeyError(f"ArrayPool has no column {name!r}; columns: {sorted(self.columns)}")
        return self.columns[name]

    def with_column(self, name: str, values: Sequence) -> "ArrayPool":
        return ArrayPool(self._ids, {**self.columns, name: values}, self.root)


# ----------------------------------------------------------------------------------------------
# checks and caching


def check_finite(X: np.ndarray, ids: Sequence[str], names: Sequence[str] | None = None, what: str = "features") -> np.ndarray:
    """Return X; raise `FeatureError` naming the first scene and feature with a NaN/inf value."""
    X = np.asarray(X)
    if X.dtype.kind in "fc":
        bad = ~np.isfinite(X)
        if bad.any():
            r, *c = np.argwhere(bad)[0]
            col = int(c[0]) if c else 0
            name = names[col] if names is not None and col < len(names) else f"column {col}"
            raise FeatureError(f"{what}: scene {ids[int(r)]!r}: feature {name!r} is {X[tuple([r, *c])]} (expected a finite number); {int(bad.any(axis=tuple(range(1, X.ndim))).sum()) if X.ndim > 1 else int(bad.sum())} scene(s) affected")
    return X


def feature_key(ids: Sequence[str], name: str, config: dict | None = None) -> str:
    """Hash of the pool ids, the feature name and its config: the cache key."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cached(pool, name: str, compute: Callable[[], tuple[np.ndarray, list[str]]], config: dict | None = None,
           cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, list[str]]:
    """`compute()` once per (pool ids, name, config); stored as `<cache_dir or POOL/features>/<name>-<key>.npy`.

    Pools without a directory (built in memory) are not cached on disk.
    """
    root = Path(cache_dir) if cache_dir is not None else (Path(pool.root) / "features" if getattr(pool, "root", None) else None)
    if root is None:
        return compute()
    key = feature_key(pool.ids, name, config)
    npy, meta = root / f"{name}-{key}.npy", root / f"{name}-{key}.json"
    if npy.is_file() and meta.is_file():
        return np.load(npy), json.loads(meta.read_text())["names"]
    X, names = compute()
    with atomic_path(npy, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, X)
    write_json(meta, {"name": name, "config": config or {}, "names": list(names), "num_scenes": len(pool), "shape": list(X.shape)})
    return X, names


def as_column(pool, name: str, X: np.ndarray):
    """The pool with feature matrix `X` (one row per scene) added as column `name` (lists of floats)."""
    X = np.asarray(X)
    if len(X) != len(pool):
        raise FeatureError(f"as_column({name!r}): {len(X)} rows for a pool of {len(pool)} scenes")
    return pool.with_column(name, X.tolist())


def column_matrix(pool, name: str) -> np.ndarray:
    """A feature column (lists of floats, e.g. from `as_column`) as an (N, D) float array, checked finite."""
    X = np.asarray(pool.column(name), dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    return check_finite(X, pool.ids, [f"{name}[{j}]" for j in range(X.shape[1])], what=f"column {name!r}")


def _scenes(pool) -> list[Scene]:
    if hasattr(pool, "dataset"):
        return list(pool)
    raise FeatureError(f"{type(pool).__name__} holds no scenes (only precomputed columns); this feature needs a ScenePool")


# ----------------------------------------------------------------------------------------------
# metadata and ego dynamics


def metadata_onehot(pool, keys: Sequence[str] = META_KEYS) -> tuple[np.ndarray, list[str]]:
    """One-hot encoding of string metadata columns; the unknown value "" gets its own column."""
    blocks, names = [], []
    for key in keys:
        vals = np.asarray(pool.column(key), dtype=object).astype(str)
        cats = sorted(set(vals))
        blocks.append((vals[:, None] == np.asarray(cats)[None, :]).astype(np.float64))
        names += [f"{key}={c or '<unknown>'}" for c in cats]
    X = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(pool), 0))
    return X, names


def ego_series_dynamics(ego: dict, acc_field: str = "accel_lat") -> np.ndarray:
    """Dynamics statistics of one ego time series (a row's `ego` struct): see `DYNAMICS_NAMES`."""
    speed = np.asarray(ego["speed"], float)
    if len(speed) == 0:
        return np.full(len(DYNAMICS_NAMES), np.nan)
    heading = np.asarray(ego["heading"], float)
    lat = np.asarray(ego["accel_lat"], float)
    return np.array([
        speed.mean(), speed.std(), np.asarray(ego["accel"], float).std(), lat.std(),
        np.abs(wrap_angle(np.diff(heading))).sum() if len(heading) > 1 else 0.0, np.abs(lat).max(),
    ])


def ego_dynamics(pool) -> tuple[np.ndarray, list[str]]:
    """(N, 6) per-scene statistics over the scene's ego frames (history and future): `DYNAMICS_NAMES`.

    cum_abs_yaw = sum of |heading change| between consecutive frames (rad).
    """
    egos = pool.column("ego")
    X = np.stack([ego_series_dynamics(e) for e in egos]) if len(egos) else np.zeros((0, len(DYNAMICS_NAMES)))
    names = list(DYNAMICS_NAMES)
    for i, e in enumerate(egos):
        if len(e["speed"]) == 0:
            raise FeatureError(f"ego dynamics: scene {pool.ids[i]!r}: feature 'ego' has no frames (expected at least one ego state)")
    return check_finite(X, pool.ids, names, "ego dynamics"), names


# ----------------------------------------------------------------------------------------------
# agent and map sets (per frame, ego frame of that frame) — SEAD's feature-shift inputs


def ego_pose_at(scene: Scene, t: int) -> np.ndarray:
    return scene.ego_trajectory()[int(t)]


def agent_set(scene: Scene, t: int | None = None, categories: Sequence[str] | None = None, radius: float | None = None) -> np.ndarray:
    """(n, 8) agents observed at frame `t` (default current) in that frame's ego frame: `AGENT_SET_NAMES`."""
    t = scene.current_index if t is None else int(t)
    a = scene.agents_at(t, frame="global")
    keep = np.ones(len(a), bool)
    if categories is not None:
        keep &= np.isin(a.category, list(categories))
    origin = ego_pose_at(scene, t)
    poses = global_to_local(np.concatenate([a.xy, a.heading[:, None]], -1), origin)[keep]
    vel = rotate_vectors(a.velocity, -origin[2])[keep]
    out = np.concatenate([poses[:, :2], vel, np.cos(poses[:, 2:3]), np.sin(poses[:, 2:3]), a.length[keep, None], a.width[keep, None]], 1)
    if radius is not None:
        out = out[np.hypot(out[:, 0], out[:, 1]) <= radius]
    return out.reshape(-1, len(AGENT_SET_NAMES))


def map_set(scene: Scene, t: int | None = None, radius: float = 50.0, spacing: float = 5.0) -> np.ndarray:
    """(m, 4) lane-centreline points every `spacing` m within `radius` m of the ego at frame `t`: `MAP_SET_NAMES`.

    Directions are the centreline's unit tangent in the ego frame.
    """
    t = scene.current_index if t is None else int(t)
    origin = ego_pose_at(scene, t)
    pts = []
    for lane in scene["map"]["lanes"]:
        line = np.asarray(lane["centerline"], float)
        if len(line) < 2:
            continue
        local = global_to_local(line, origin)
        seg = np.diff(local, axis=0)
        seg_len = np.hypot(seg[:, 0], seg[:, 1])
        cum = np.concatenate([[0.0], np.cumsum(seg_len)])
        if cum[-1] <= 0:
            continue
        s = np.arange(0.0, cum[-1] + 1e-9, spacing)
        x, y = np.interp(s, cum, local[:, 0]), np.interp(s, cum, local[:, 1])
        k = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1)
        d = seg[k] / np.maximum(seg_len[k], 1e-12)[:, None]
        pts.append(np.stack([x, y, d[:, 0], d[:, 1]], 1))
    out = np.concatenate(pts) if pts else np.zeros((0, 4))
    return out[np.hypot(out[:, 0], out[:, 1]) <= radius]


def nearest_agent_distance(scene: Scene, t: int | None = None, categories: Sequence[str] | None = None) -> float:
    """Distance (m) from the ego rear axle to the nearest agent box centre at frame `t`; inf if none."""
    s = agent_set(scene, t, categories)
    return float(np.hypot(s[:, 0], s[:, 1]).min()) if len(s) else float("inf")


# ----------------------------------------------------------------------------------------------
# dense scene vectors (clustering, coreset) and planner inputs (the fast pilot)


def scene_summary(scene: Scene, radius: float = 50.0) -> np.ndarray:
    """Agent and map summaries at the current frame: count, nearest distance (capped at `radius`), mean
    relative speed of agents within `radius`, number of lane points within `radius`, mean |lane direction
    angle| (how much the road turns near the ego)."""
    a = agent_set(scene, radius=radius)
    m = map_set(scene, radius=radius)
    near = float(np.hypot(a[:, 0], a[:, 1]).min()) if len(a) else radius
    rel_speed = float(np.hypot(a[:, 2], a[:, 3]).mean()) if len(a) else 0.0
    turn = float(np.abs(np.arctan2(m[:, 3], m[:, 2])).mean()) if len(m) else 0.0
    return np.array([len(a), near, rel_speed, len(m), turn])


SUMMARY_NAMES = ("num_agents", "nearest_agent_m", "agent_speed_mean", "num_lane_points", "lane_turn_mean")


def scene_features(pool, meta_keys: Sequence[str] = META_KEYS, radius: float = 50.0) -> tuple[np.ndarray, list[str]]:
    """The default dense per-scene vector: metadata one-hot + ego dynamics + agent/map summaries."""
    M, mn = metadata_onehot(pool, meta_keys)
    D, dn = ego_dynamics(pool)
    S = np.stack([scene_summary(s, radius) for s in _scenes(pool)]) if len(pool) else np.zeros((0, len(SUMMARY_NAMES)))
    X = np.concatenate([M, D, S], axis=1)
    names = mn + dn + list(SUMMARY_NAMES)
    return check_finite(X, pool.ids, names, "scene features"), names


def planner_inputs(scene: Scene, history: int = 4, interval: float = 0.5, k_agents: int = 4, num_poses: int = 8) -> np.ndarray:
    """A fixed-length input vector for a light planner (all in the current ego frame).

    ego history poses (`history` x 3, oldest first; the earliest available pose repeats if the scene's
    history is shorter), current speed, accel, lateral accel, yaw rate, command one-hot (4), the `k_agents`
    nearest agents (x, y, vx, vy each; padding far ahead at (100, 0) with zero velocity), and route anchors:
    the route centreline's points at arc length v·t_k ahead of the ego's projection, t_k = interval ..
    num_poses·interval (x, y each; on the nearest lane if there is no route, straight ahead if no lane) —
    where the ego would be at constant speed along its route.
    """
    try:
        hist = scene.history_trajectory(history, interval, "ego")
    except ValueError:
        traj = scene.ego_trajectory("ego")
        t = np.asarray(scene["ego"]["t"], float)
        times = np.maximum(-np.arange(history - 1, -1, -1) * interval, t[0])
        hist = np.stack([np.interp(times, t, traj[:, j]) for j in range(3)], -1)
    e, ci = scene["ego"], scene.current_index
    dyn = [e["speed"][ci], e["accel"][ci], e["accel_lat"][ci], e["yaw_rate"][ci]]
    cmd = [float(scene["command"] == c) for c in ("left", "straight", "right", "unknown")]
    a = agent_set(scene)
    order = np.argsort(np.hypot(a[:, 0], a[:, 1]))[:k_agents]
    agents = np.tile(np.array([100.0, 0.0, 0.0, 0.0]), (k_agents, 1))
    agents[: len(order)] = a[order][:, :4]
    ahead = max(float(e["speed"][ci]), 0.0) * np.arange(1, num_poses + 1) * interval
    return np.concatenate([hist.ravel(), dyn, cmd, agents.ravel(), route_points_ahead(scene, ahead).ravel()])


def planner_input_layout(history: int = 4, k_agents: int = 4, num_poses: int = 8) -> dict[str, slice]:
    """Where each part sits in `planner_inputs`' vector (same arguments)."""
    parts = (("history", 3 * history), ("dynamics", 4), ("command", 4), ("agents", 4 * k_agents), ("route", 2 * num_poses))
    out, start = {}, 0
    for name, n in parts:
        out[name] = slice(start, start + n)
        start += n
    return out


def route_points_ahead(scene: Scene, ahead: Sequence[float]) -> np.ndarray:
    """(len(ahead), 2) points `ahead` metres along the route from the ego's projection, in the ego frame."""
    from shapely import Point

    ahead = np.asarray(ahead, float)
    line = scene.route_centerline(frame="ego")
    if line is None:
        lanes = list(scene.lane_centerlines(frame="ego").values())
        line = min(lanes, key=lambda l: l.distance(Point(0, 0))) if lanes else None
    if line is None or line.length == 0:
        return np.stack([ahead, np.zeros(len(ahead))], 1)
    s0 = line.project(Point(0, 0))
    return np.array([[p.x, p.y] for p in (line.interpolate(min(s0 + d, line.length)) for d in ahead)])


# ----------------------------------------------------------------------------------------------
# image embeddings from a model's vision tower


def vision_tower(model):
    """The vision tower of a VLM (`vision_tower`, `vision_model`, `visual`, or under `.model`), else `model`."""
    for holder in (model, getattr(model, "model", None)):
        for name in ("vision_tower", "vision_model", "visual"):
            tower = getattr(holder, name, None) if holder is not None else None
            if tower is not None:
                return tower
    return model


def image_embeddings(pool, model, *, camera: str | None = None, batch_size: int = 16, image_size: int | None = None,
                     mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                     pooling: str = "auto", device: str = "cpu", progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """(N, D) embeddings of each scene's current-frame image (first image of `camera`, any camera if None).

    Images are resized to `image_size` (default `model.config.image_size`) and normalised with mean/std
    (the SigLIP defaults 0.5/0.5). `pooling`: "pooler" (pooler_output), "mean" (mean of last_hidden_state
    over tokens) or "auto" (pooler if the model returns one). Runs batched under torch.no_grad().
    """
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    tower = vision_tower(model).to(device).eval()
    size = int(image_size or getattr(getattr(tower, "config", None), "image_size", 224))
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    paths = []
    for scene in _scenes(pool):
        found = scene.image_paths(camera=camera, frame=scene.current_index) or ([] if camera else scene.image_paths(camera=camera))
        if not found:
            raise FeatureError(f"image embeddings: scene {scene.id!r}: feature 'images' has no image for camera {camera or 'any'} at frame {scene.current_index}")
        if not Path(found[0]).is_file():
            raise FeatureError(f"image embeddings: scene {scene.id!r}: image file {found[0]} does not exist")
        paths.append(found[0])
    out = []
    with torch.no_grad():
        for b in tqdm(range(0, len(paths), batch_size), desc="image embeddings", disable=not progress):
            ims = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0 for p in paths[b:b + batch_size]]
            x = (torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2) - m) / s
            o = tower(pixel_values=x.to(device))
            pooled = getattr(o, "pooler_output", None)
            if pooling == "mean" or (pooling == "auto" and pooled is None):
                pooled = o.last_hidden_state.mean(1)
            elif pooled is None:
                raise FeatureError("image embeddings: pooling='pooler' but the model returns no pooler_output")
            out.append(pooled.float().cpu().numpy())
    X = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return check_finite(X, pool.ids, None, "image embeddings"), [f"img_{j}" for j in range(X.shape[1])]


FEATURE_KINDS = {"scene": scene_features, "metadata": metadata_onehot, "dynamics": ego_dynamics}


def resolve_features(pool, spec: str | np.ndarray | None = "scene", standardize: bool = True) -> tuple[np.ndarray, list[str], str]:
    """A dense (N, D) matrix for clustering/coreset: an array, a pool column name, or a kind in FEATURE_KINDS.

    Returns (X, names, description). Kinds are cached next to the pool; columns are read as they are.
    `standardize` scales each column to zero mean and unit variance (constant columns are left at 0).
    """
    if isinstance(spec, np.ndarray):
        X, names, desc = spec, [f"f{j}" for j in range(spec.shape[1])], "array"
        check_finite(X, pool.ids, names, "features")
    elif spec in FEATURE_KINDS:
        X, names = cached(pool, spec, lambda: FEATURE_KINDS[spec](pool))
        desc = f"kind:{spec}"
    elif isinstance(spec, str):
        X = column_matrix(pool, spec)
        names, desc = [f"{spec}[{j}]" for j in range(X.shape[1])], f"column:{spec}"
    else:
        raise FeatureError(f"features: expected an array, a pool column name or one of {sorted(FEATURE_KINDS)}, got {spec!r}")
    if len(X) != len(pool):
        raise FeatureError(f"features ({desc}): {len(X)} rows for a pool of {len(pool)} scenes")
    X = np.asarray(X, dtype=np.float32)
    if standardize and len(X):
        mu, sd = X.mean(0), X.std(0)
        X = (X - mu) / np.where(sd > 0, sd, 1.0)
    return X, list(names), desc
