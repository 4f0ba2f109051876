"""What the ego may collide with over the scored horizon, at 0.1 s: other road users and static objects
as oriented boxes, and red traffic lights as lane-connector polygons.

Two ways to build it, as in NAVSIM:
- `log_replay`: the logged future (the 2 Hz boxes at t = 0..4 s, as the devkit's metric cache; 0..5 s for PDMS)
  linearly interpolated to 10 Hz between a track's first and last observation (heading along the shortest turn);
  a track observed once is held for the whole horizon;
  tracks already overlapping the ego at t = 0 are dropped (v2 log replay). This is what the scorer uses.
- `constant_velocity`: only the current frame, extrapolated with each agent's velocity and refreshed every
  2nd step, within `map_radius`; this is what PDM-Closed sees when it plans its reference trajectory.

Red lights: an on-route lane whose light is red in a 2 Hz frame is an obstacle for the 5 steps of that frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.geometry import box_corners, wrap_angle
from datasets_cfg.schema import STATIC_CATEGORIES
from eval.navsim.config import AGENT_TYPES
from eval.navsim.geometry import PolygonSet, boxes_intersect


@dataclass
class Observation:
    """Objects over T steps (index 0 = now). Arrays are (T, N, ...) unless noted."""

    track_id: np.ndarray  # (N,) str
    category: np.ndarray  # (N,) str
    is_agent: np.ndarray  # (N,) bool: vehicle / pedestrian / bicycle (collisions cost 0 instead of 0.5)
    stopped: np.ndarray  # (N,) bool: static category or first-seen speed <= track_stopped_speed (NC uses the speed at the contact step)
    valid: np.ndarray  # (T, N) bool: the object exists at this step
    xy: np.ndarray  # (T, N, 2) box centre
    heading: np.ndarray  # (T, N)
    velocity: np.ndarray  # (T, N, 2)
    corners: np.ndarray  # (T, N, 4, 2)
    radius: np.ndarray  # (N,) half diagonal, for cheap distance pre-filters
    red_lights: PolygonSet  # R lane polygons that are red at some step
    red_active: np.ndarray  # (T, R) bool
    red_lane_ids: tuple = ()

    @property
    def num_steps(self) -> int:
        return self.valid.shape[0]


def _empty(T: int) -> dict:
    return dict(
        track_id=np.zeros(0, dtype=str), category=np.zeros(0, dtype=str), is_agent=np.zeros(0, bool), stopped=np.zeros(0, bool),
        valid=np.zeros((T, 0), bool), xy=np.zeros((T, 0, 2)), heading=np.zeros((T, 0)), velocity=np.zeros((T, 0, 2)),
        corners=np.zeros((T, 0, 4, 2)), radius=np.zeros(0),
    )


def _finish(fields: dict, lengths: np.ndarray, widths: np.ndarray, track_stopped_speed: float, first_velocity: np.ndarray) -> dict:
    cat = fields["category"]
    static = np.isin(cat, STATIC_CATEGORIES)
    fields["is_agent"] = np.isin(cat, AGENT_TYPES)
    fields["stopped"] = static | ~fields["is_agent"] | (np.linalg.norm(first_velocity, axis=-1) <= track_stopped_speed)
    fields["corners"] = box_corners(fields["xy"][..., 0], fields["xy"][..., 1], fields["heading"], lengths[None], widths[None])
    fields["radius"] = 0.5 * np.hypot(lengths, widths)
    return fields


def _red_lights(scene, lanes: dict, on_route: set, frame_times: np.ndarray, step_times: np.ndarray, current_only: bool):
    """On-route lanes red at some step: their polygons and a (T, R) activity mask."""
    tl = scene["traffic_lights"]
    frames = np.asarray(tl["frame"], dtype=np.int64)
    ids = np.asarray(tl["lane_id"], dtype=object)
    red = np.asarray(tl["is_red"], dtype=bool)
    ci = scene.current_index
    keep = red & np.isin(ids, list(on_route)) if len(ids) else np.zeros(0, bool)
    keep &= np.array([i in lanes and len(lanes[i]) >= 3 for i in ids], dtype=bool) if len(ids) else keep
    if current_only:
        keep &= frames == ci
    lane_ids = sorted(set(ids[keep].tolist()))
    active = np.zeros((len(step_times), len(lane_ids)), dtype=bool)
    if lane_ids:
        col = {lid: j for j, lid in enumerate(lane_ids)}
        if current_only:
            active[:, [col[i] for i in ids[keep]]] = True
        else:
            # the 2 Hz frame governing each step: the latest frame at or before it
            step_frame = np.searchsorted(frame_times, step_times + 1e-6, side="right") - 1
            for f, lid in zip(frames[keep], ids[keep]):
                active[step_frame == f, col[lid]] = True
    return PolygonSet([np.asarray(lanes[i], float) for i in lane_ids]), active, tuple(lane_ids)


def replay_frames(t_ego: np.ndarray, frame_interval: float | None, frame_horizon: float | None) -> np.ndarray:
    """Indices of the frames log replay reads objects from: with `frame_interval`, the frame nearest to each of
    t = 0, interval, ..., frame_horizon (within interval / 4), as the devkit's metric cache reads the 2 Hz frames
    at t = 0..4 s only (navsim navsim/planning/metric_caching/metric_cache_processor.py:116-125); else every
    frame from now on."""
    fut = np.flatnonzero(t_ego >= -1e-6)
    if frame_interval is None or len(fut) == 0:
        return fut
    horizon = np.inf if frame_horizon is None else frame_horizon
    targets = np.arange(0, int(np.floor(min(horizon, t_ego[fut][-1] + frame_interval) / frame_interval + 1e-9)) + 1) * frame_interval
    tf = t_ego[fut]
    near = np.abs(tf[None, :] - targets[:, None])
    j = np.argmin(near, axis=1)
    ok = near[np.arange(len(targets)), j] <= frame_interval / 4
    return np.unique(fut[j[ok]])


def log_replay(scene, ego_corners0: np.ndarray, on_route: set, lanes: dict, num_steps: int = 41, dt: float = 0.1,
               track_stopped_speed: float = 5e-2, frame_interval: float | None = None, frame_horizon: float | None = None) -> Observation:
    """Logged future objects of `scene` at `dt` for `num_steps` steps from the current frame.

    `ego_corners0` (4, 2) is the ego box at t = 0 (objects overlapping it are dropped); `lanes` maps lane
    id -> polygon ring; `on_route` is the set of on-route lane ids (red lights elsewhere are ignored).
    `frame_interval` / `frame_horizon`: read objects from the frames at 0, interval, ..., horizon only
    (`replay_frames`); objects do not exist past the last frame read.
    """
    t_ego = np.asarray(scene["ego"]["t"], float)
    step_times = np.arange(num_steps) * dt
    a = scene["agents"]
    frame = np.asarray(a["frame"], dtype=np.int64)
    fields = _empty(num_steps)
    lengths = widths = first_v = np.zeros(0)
    fut = replay_frames(t_ego, frame_interval, frame_horizon)  # frames from now on
    sel = np.flatnonzero(np.isin(frame, fut)) if len(frame) else np.zeros(0, np.int64)
    if len(sel):
        tid = np.asarray(a["track_id"], dtype=object)[sel]
        tracks, inv = np.unique(tid.astype(str), return_inverse=True)
        fidx = np.searchsorted(fut, frame[sel])  # position among future frames
        F, N = len(fut), len(tracks)
        present = np.zeros((F, N), bool)
        table = np.zeros((F, N, 5))  # x, y, heading, vx, vy
        cols = [np.asarray(a[k], float)[sel] for k in ("x", "y", "heading", "vx", "vy")]
        present[fidx, inv] = True
        table[fidx, inv] = np.stack(cols, -1)
        first = np.argmax(present, axis=0)
        cat = np.asarray(a["category"], dtype=object)[sel]
        category = np.empty(N, dtype=object)
        category[inv[::-1]] = cat[::-1]  # any observation's category (constant per track)
        length = np.zeros(N); width = np.zeros(N)  # noqa: E702
        # size of the first observation (as the devkit copies the initial box)
        order = np.lexsort((fidx, inv))
        firsts = order[np.r_[True, inv[order][1:] != inv[order][:-1]]]
        length[inv[firsts]] = np.asarray(a["length"], float)[sel][firsts]
        width[inv[firsts]] = np.asarray(a["width"], float)[sel][firsts]

        ft = t_ego[fut]
        idx = np.where(present, np.arange(F)[:, None], -1)
        prev_at = np.maximum.accumulate(idx, axis=0)
        nxt_at = np.flip(np.minimum.accumulate(np.flip(np.where(present, np.arange(F)[:, None], F), 0), axis=0), 0)
        k_prev = np.clip(np.searchsorted(ft, step_times + 1e-9, side="right") - 1, 0, F - 1)
        k_next = np.clip(np.searchsorted(ft, step_times - 1e-9, side="left"), 0, F - 1)
        p, n = prev_at[k_prev], nxt_at[k_next]  # (T, N)
        beyond = step_times[:, None] > ft[-1] + 1e-9
        n = np.where(beyond, F, n)
        once = present.sum(0) == 1
        p = np.where(once[None], first[None], p)
        n = np.where(once[None], first[None], n)
        valid = (p >= 0) & (n < F)
        p, n = np.clip(p, 0, F - 1), np.clip(n, 0, F - 1)
        cols_n = np.arange(N)[None]
        tp, tn = ft[p], ft[n]
        w = np.where(tn > tp, (step_times[:, None] - tp) / np.maximum(tn - tp, 1e-9), 0.0)
        vp, vn = table[p, cols_n], table[n, cols_n]
        vals = vp + (vn - vp) * w[..., None]
        vals[..., 2] = wrap_angle(vp[..., 2] + wrap_angle(vn[..., 2] - vp[..., 2]) * w)
        static = np.isin(category.astype(str), STATIC_CATEGORIES)
        vals[..., 3:5][:, static] = 0.0
        first_v = table[first, np.arange(N), 3:5] * (~static)[:, None]
        fields.update(track_id=tracks, category=category.astype(str), valid=valid, xy=vals[..., :2], heading=vals[..., 2], velocity=vals[..., 3:5])
        lengths, widths = length, width
    fields = _finish(fields, lengths, widths, track_stopped_speed, first_v.reshape(-1, 2))
    # v2 log replay: drop objects that already overlap the ego at t = 0
    if len(fields["track_id"]):
        drop = fields["valid"][0] & boxes_intersect(ego_corners0[None], fields["corners"][0])
        if drop.any():
            keep = ~drop
            for k in ("track_id", "category", "is_agent", "stopped", "radius"):
                fields[k] = fields[k][keep]
            for k in ("valid", "xy", "heading", "velocity", "corners"):
                fields[k] = fields[k][:, keep]
    reds, active, red_ids = _red_lights(scene, lanes, on_route, t_ego, step_times, current_only=False)
    return Observation(**fields, red_lights=reds, red_active=active, red_lane_ids=red_ids)


def constant_velocity(scene, ego_corners0: np.ndarray, ego_center0: np.ndarray, on_route: set, lanes: dict, num_steps: int = 41,
                      dt: float = 0.1, map_radius: float = 100.0, sample_res: int = 2, track_stopped_speed: float = 5e-2) -> Observation:
    """PDM-Closed's forecast: current-frame objects moved with their velocity, refreshed every `sample_res` steps."""
    ag = scene.agents_at()
    keep = np.linalg.norm(ag.xy - ego_center0[None], axis=1) <= map_radius if len(ag) else np.zeros(0, bool)
    N = int(keep.sum())
    fields = _empty(num_steps)
    lengths = widths = np.zeros(0)
    first_v = np.zeros((0, 2))
    if N:
        static = np.isin(ag.category[keep], STATIC_CATEGORIES)
        vel = ag.velocity[keep] * (~static)[:, None]
        t_held = (np.arange(num_steps) // sample_res) * sample_res * dt
        xy = ag.xy[keep][None] + t_held[:, None, None] * vel[None]
        fields.update(track_id=ag.track_id[keep], category=ag.category[keep], valid=np.ones((num_steps, N), bool), xy=xy,
                      heading=np.repeat(ag.heading[keep][None], num_steps, 0), velocity=np.repeat(vel[None], num_steps, 0))
        lengths, widths, first_v = ag.length[keep], ag.width[keep], vel
    fields = _finish(fields, lengths, widths, track_stopped_speed, first_v)
    if N:  # objects overlapping the ego now are ignored from then on (PDMObservation's collided tracks)
        drop = boxes_intersect(ego_corners0[None], fields["corners"][0])
        if drop.any():
            k = ~drop
            for f in ("track_id", "category", "is_agent", "stopped", "radius"):
                fields[f] = fields[f][k]
            for f in ("valid", "xy", "heading", "velocity", "corners"):
                fields[f] = fields[f][:, k]
    t_ego = np.asarray(scene["ego"]["t"], float)
    reds, active, red_ids = _red_lights(scene, lanes, on_route, t_ego, np.arange(num_steps) * dt, current_only=True)
    if len(reds):  # a red light the ego already stands fully inside is ignored (PDMObservation)
        import shapely

        ego_poly = shapely.Polygon(ego_corners0)
        inside = shapely.within(ego_poly, reds.geoms)
        active[:, inside] = False
    return Observation(**fields, red_lights=reds, red_active=active, red_lane_ids=red_ids)
