"""PDM-Closed, the reference planner whose progress normalises EP (and a usable baseline agent).

As NAVSIM's metric caching runs it: three paths (the route centreline and copies offset -1 m / +1 m), five
IDM speed profiles on each (0.2 ... 1.0 x the lane's speed limit, 15 m/s if unknown) -> 15 proposals of
4 s at 0.1 s; leading objects (agents, static objects, red lights) are searched every 2nd step in a
corridor along the path, using a constant-velocity forecast of the current frame; every proposal is
simulated with the LQR tracker and scored (v2: NC·DAC·DDC·TLC·(5 EP + 5 TTC + 2 LK + 2 HC)/14 with HC = 1
as upstream, v1: the PDMS formula); the best one is the reference trajectory.

Kept from upstream on purpose, because they shape the reference progress: the leading-agent record is
all zeros at step 1 (the first IDM step brakes), and within one path the record is shared by the five
profiles (a field a profile does not set keeps the previous profile's value).

Many scenes are planned together: the 40 IDM steps run once for all of them (objects padded), so the
per-step numpy overhead is shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import shapely

from eval.navsim import aggregate, metrics
from eval.navsim.config import DEFAULT, VX, Protocol, X, Y
from eval.navsim.geometry import boxes_distance, ego_boxes
from eval.navsim.observation import constant_velocity
from eval.navsim.simulate import track


@dataclass
class PDMClosedPlan:
    poses: np.ndarray  # (T, 3) global poses of the chosen proposal, t = 0 .. 4 s (NOT simulated)
    proposals: np.ndarray  # (15, T, 3)
    scores: np.ndarray  # (15,)
    best: int


def forecast(ctx, protocol: Protocol = DEFAULT):
    """PDM-Closed's view of the scene: the current frame under a constant-velocity forecast (5 s)."""
    sp = protocol.scorer
    corners0, center0 = ego_boxes(ctx.initial, ctx.vehicle)
    T = int(round((sp.horizon_s + sp.ttc_horizon) / sp.dt)) + 1
    return constant_velocity(ctx.scene, corners0, center0, ctx.on_route, ctx.lanes, T, sp.dt, map_radius=sp.map_radius,
                             track_stopped_speed=sp.track_stopped_speed)


class _MultiPath:
    """Many polylines in one array, so poses on all of them come from a handful of vectorised calls.

    Path k's vertices are stored after path k-1's; the segment of a query is found on arc lengths shifted
    by k * 1e6, the interpolation itself uses the path's own arc lengths, so a pose does not depend on which
    other paths share the batch."""

    SPAN = 1e6

    def __init__(self, paths):
        self.lengths = np.array([p.length for p in paths])
        self.base = np.arange(len(paths)) * self.SPAN
        self.first = np.cumsum([0] + [len(p.s) for p in paths[:-1]])
        self.last = self.first + np.array([len(p.s) for p in paths]) - 1
        self.s_local = np.concatenate([p.s for p in paths])
        self.s = np.concatenate([p.s + b for p, b in zip(paths, self.base)])
        self.x = np.concatenate([p.xy[:, 0] for p in paths])
        self.y = np.concatenate([p.xy[:, 1] for p in paths])
        self.h = np.concatenate([p.heading for p in paths])

    def poses(self, path_ids: np.ndarray, s: np.ndarray) -> np.ndarray:
        s = np.clip(s, 0.0, self.lengths[path_ids])
        j = np.searchsorted(self.s, s + self.base[path_ids], side="right") - 1
        j = np.clip(j, self.first[path_ids], self.last[path_ids] - 1)
        s0, s1 = self.s_local[j], self.s_local[j + 1]
        w = np.clip((s - s0) / np.maximum(s1 - s0, 1e-12), 0.0, 1.0)
        return np.stack([a[j] + w * (a[j + 1] - a[j]) for a in (self.x, self.y, self.h)], -1)


def _ego_corners(poses: np.ndarray, veh) -> np.ndarray:
    return ego_boxes(np.concatenate([poses, np.zeros(poses.shape[:-1] + (8,))], -1), veh)[0]


def _corridor(path, s0: float, length: float, half_width: float):
    poly = shapely.LineString(path.substring(s0, s0 + length)).buffer(half_width, cap_style="square")
    shapely.prepare(poly)
    return poly


def _prepare(ctx, obs, protocol: Protocol, T: int) -> dict:
    """Per-scene, step-independent parts of proposal generation: paths, corridors, objects in them."""
    idm, veh = protocol.idm, ctx.vehicle
    paths = [ctx.centerline.offset(o) for o in idm.lateral_offsets]
    limit = ctx.speed_limit if np.isfinite(ctx.speed_limit) and ctx.speed_limit > 0 else idm.fallback_target_velocity
    targets = np.asarray(idm.speed_limit_fractions) * limit
    N, R = obs.valid.shape[1], len(obs.red_lights)
    rear0 = ctx.initial[[X, Y]]
    prog0 = np.array([p.project(rear0[None])[0][0] for p in paths])
    corridors = [_corridor(p, s0, targets.max() * idm.corridor_horizon_s, veh.width / 2) for p, s0 in zip(paths, prog0)] if R else []
    in_corr = np.zeros((len(paths), T, N), bool)
    obj_s = np.zeros((len(paths), T, N))
    red_in = np.zeros((len(paths), R), bool)
    red_s = np.zeros((len(paths), R))
    red_xy = shapely.get_coordinates(shapely.centroid(obs.red_lights.geoms)) if R else np.zeros((0, 2))
    half_w = veh.width / 2
    for j, p in enumerate(paths):
        if N:
            # an object touches the corridor (the path from s0 to s1 widened by half the ego width, square ends)
            # if its corners straddle the band |lateral| <= w/2 within [s0 - w/2, s1 + w/2]; exact on straight
            # paths, the local tangent frame on curved ones
            s, d = p.project(obs.xy[:T], signed=True)
            n = p.normal_at(s)  # (T, N, 2)
            t_dir = np.stack([n[..., 1], -n[..., 0]], -1)
            rel = obs.corners[:T] - obs.xy[:T][..., None, :]
            lat = d[..., None] + (rel * n[..., None, :]).sum(-1)
            lon = s[..., None] + (rel * t_dir[..., None, :]).sum(-1)
            s0, s1 = prog0[j], prog0[j] + targets.max() * idm.corridor_horizon_s
            in_corr[j] = (obs.valid[:T] & (lat.min(-1) <= half_w) & (lat.max(-1) >= -half_w)
                          & (lon.max(-1) >= s0 - half_w) & (lon.min(-1) <= min(s1, p.length) + half_w))
            obj_s[j] = s
        if R:
            red_in[j] = shapely.intersects(corridors[j], obs.red_lights.geoms)
            red_s[j] = p.project(red_xy)[0]
    return dict(paths=paths, targets=targets, prog0=prog0, in_corr=in_corr, obj_s=obj_s, red_in=red_in, red_s=red_s)


def _pad(a: np.ndarray, width: int, axis: int, fill=0) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, width - a.shape[axis])
    return np.pad(a, pad, constant_values=fill)


def _carry(values: np.ndarray, is_set: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per row of `grid` (the profiles of one path, in order): the value of the latest profile so far that set
    it (0 if none)."""
    v, m = values[grid], is_set[grid]
    idx = np.maximum.accumulate(np.where(m, np.arange(grid.shape[1])[None], -1), axis=1)
    res = np.empty(len(values))
    res[grid] = np.where(idx >= 0, np.take_along_axis(v, np.maximum(idx, 0), axis=1), 0.0)
    return res


def generate_proposals_batch(ctxs: list, protocol: Protocol = DEFAULT, observations: list | None = None) -> np.ndarray:
    """(S, 15, T, 3) global proposal poses (paths x IDM profiles, path-major) for S scene contexts."""
    idm, sp = protocol.idm, protocol.scorer
    dt = sp.dt
    T = int(round(sp.horizon_s / dt)) + 1
    S = len(ctxs)
    observations = observations or [forecast(c, protocol) for c in ctxs]
    prep = [_prepare(c, o, protocol, T) for c, o in zip(ctxs, observations)]
    n_path, n_lon = len(idm.lateral_offsets), len(idm.speed_limit_fractions)
    n_prop = n_path * n_lon
    M = S * n_prop
    scene_of = np.repeat(np.arange(S), n_prop)
    path_of = np.repeat(np.arange(S * n_path), n_lon)  # global path id of every proposal
    target = np.concatenate([np.tile(p["targets"], n_path) for p in prep])
    multipath = _MultiPath([path for p in prep for path in p["paths"]])

    Nm = max(1, max(o.valid.shape[1] for o in observations))
    Rm = max(1, max(len(o.red_lights) for o in observations))
    in_corr = np.concatenate([_pad(p["in_corr"], Nm, 2, False) for p in prep])  # (S*3, T, Nm)
    obj_s = np.concatenate([_pad(p["obj_s"], Nm, 2) for p in prep])
    red_in = np.concatenate([_pad(p["red_in"], Rm, 1, False) for p in prep])  # (S*3, Rm)
    red_s = np.concatenate([_pad(p["red_s"], Rm, 1) for p in prep])
    red_active = np.stack([_pad(o.red_active[:T], Rm, 1, False) for o in observations])  # (S, T, Rm)
    corners = np.stack([_pad(o.corners[:T], Nm, 1) for o in observations])  # (S, T, Nm, 4, 2)
    heading = np.stack([_pad(o.heading[:T], Nm, 1) for o in observations])
    speed = np.stack([_pad(np.linalg.norm(o.velocity[:T], axis=-1), Nm, 1) for o in observations])
    is_agent = np.stack([_pad(o.is_agent, Nm, 0, False) for o in observations])  # (S, Nm)
    red_geoms = [o.red_lights.geoms for o in observations]
    radius = np.stack([_pad(o.radius, Nm, 0) for o in observations])  # (S, Nm)
    n_prop_ = len(idm.lateral_offsets) * len(idm.speed_limit_fractions)
    ego_len = np.repeat([c.vehicle.length for c in ctxs], n_prop_)
    ego_wid = np.repeat([c.vehicle.width for c in ctxs], n_prop_)
    ego_off = np.repeat([c.vehicle.rear_axle_to_center for c in ctxs], n_prop_)
    ego_radius = 0.5 * np.hypot(ego_len, ego_wid)

    prog = np.concatenate([np.repeat(p["prog0"], n_lon) for p in prep])
    vel = np.repeat(np.array([c.initial[VX] for c in ctxs], dtype=float), n_prop)
    progs = np.zeros((M, T))
    progs[:, 0] = prog
    lead = np.zeros((M, 3))  # progress, velocity, rear length of the leading object
    grid = np.arange(M).reshape(S * n_path, n_lon)
    rows = np.arange(M)
    for t in range(1, T):
        if t % idm.leading_agent_update_rate == 0:
            pi, ni = np.nonzero(in_corr[path_of, t] & (obj_s[path_of, t] > prog[:, None]))
            qi, ri = np.nonzero(red_in[path_of] & (red_s[path_of] > prog[:, None]) & red_active[scene_of, t])
            found = is_obj = np.zeros(M, bool)
            v_obj = gap = np.zeros(M)
            if len(pi) or len(qi):
                need = np.unique(np.concatenate([pi, qi]))
                pose_prev = np.zeros((M, 3))
                pose_prev[need] = multipath.poses(path_of[need], prog[need])
                ego_c = np.zeros((M, 4, 2))
                ego_c[need] = _ego_corners(pose_prev[need], SimpleNamespace(length=ego_len[need], width=ego_wid[need], rear_axle_to_center=ego_off[need]))
                dist = np.full((M, Nm + Rm), np.inf)
                if len(pi):
                    # only pairs that can be the nearest: the box distance is at most the centre distance and at
                    # least the centre distance minus both half diagonals
                    oc = corners[scene_of[pi], t, ni]
                    cd = np.hypot(*(0.5 * (oc[:, 0] + oc[:, 2]) - 0.5 * (ego_c[pi, 0] + ego_c[pi, 2])).T)
                    ub = np.full(M, np.inf)
                    np.minimum.at(ub, pi, cd)
                    keep = cd - ego_radius[pi] - radius[scene_of[pi], ni] <= ub[pi] + 1e-9
                    pi, ni = pi[keep], ni[keep]
                    dist[pi, ni] = boxes_distance(ego_c[pi], oc[keep])
                if len(qi):
                    reds = np.array([red_geoms[scene_of[q]][r] for q, r in zip(qi, ri)], dtype=object)
                    dist[qi, Nm + ri] = shapely.distance(shapely.polygons(ego_c[qi]), reds)
                k = dist.argmin(1)
                gap = dist[rows, k]
                found = np.isfinite(gap)
                is_obj = found & (k < Nm)
                kk = np.minimum(k, Nm - 1)
                rel = heading[scene_of, t, kk] - pose_prev[:, 2]
                v_obj = np.where(is_obj & is_agent[scene_of, kk], speed[scene_of, t, kk] * np.cos(rel), 0.0)
            lead[:, 0] = np.where(found, prog + np.where(found, gap, 0.0), multipath.lengths[path_of])
            # velocity and rear length are set by some profiles only; the others keep the value of the
            # previous profile on the same path (the devkit reuses one record per path)
            lead[:, 1] = _carry(v_obj, is_obj, grid)
            lead[:, 2] = _carry(ego_len / 2, ~found, grid)
        # (odd steps keep the previous record; at t = 1 it is still all zeros, as upstream)
        x_lead, v_lead, l_r = lead[:, 0], lead[:, 1], lead[:, 2]
        s_star = idm.min_gap_to_lead_agent + vel * idm.headway_time + vel * (vel - v_lead) / (2 * np.sqrt(idm.accel_max * idm.decel_max))
        s_alpha = np.maximum(x_lead - prog - l_r, idm.min_gap_to_lead_agent)
        v_dot = idm.accel_max * (1 - (vel / np.maximum(target, 1e-6)) ** idm.acceleration_exponent - (s_star / s_alpha) ** 2)
        v_dot = np.clip(v_dot, -idm.decel_max, idm.accel_max)
        prog = prog + dt * vel
        vel = vel + dt * v_dot
        progs[:, t] = prog
    poses = multipath.poses(np.repeat(path_of[:, None], T, 1), progs)
    return poses.reshape(S, n_prop, T, 3)


def generate_proposals(ctx, protocol: Protocol = DEFAULT, obs=None) -> np.ndarray:
    """(15, T, 3) global proposal poses for one scene context."""
    return generate_proposals_batch([ctx], protocol, None if obs is None else [obs])[0]


def proposal_scores(sub: dict, version: str, threshold: float) -> np.ndarray:
    """PDM scores of proposals scored together (v2 without EC; HC as given)."""
    multi = aggregate.multiplicative_product(sub, version)
    ep = aggregate.normalise_progress(sub["progress_raw"], multi, threshold, version)
    if version == "v2":
        w = 5 * ep + 5 * sub["time_to_collision_within_bound"] + 2 * sub["lane_keeping"] + 2 * sub["history_comfort"]
        return multi * w / 14.0
    return multi * (5 * ep + 5 * sub["time_to_collision_within_bound"] + 2 * sub["comfort"]) / 12.0


def plan_batch(ctxs: list, protocol: Protocol = DEFAULT, version: str = "v2") -> list[PDMClosedPlan]:
    """Run PDM-Closed on many scene contexts: generation and simulation batched, scoring per scene."""
    if not ctxs:
        return []
    sp = protocol.scorer
    observations = [forecast(c, protocol) for c in ctxs]
    proposals = generate_proposals_batch(ctxs, protocol, observations)
    S, P, T, _ = proposals.shape
    init = np.repeat(np.stack([c.initial for c in ctxs]), P, 0)
    states = track(proposals.reshape(S * P, T, 3), init, protocol, sp.dt).reshape(S, P, T, -1)
    out = []
    for c, o, props, st in zip(ctxs, observations, proposals, states):
        sub = metrics.submetrics(st, c, o, protocol, version, history=None)
        scores = proposal_scores(sub, version, sp.progress_distance_threshold)
        best = int(np.argmax(scores))
        out.append(PDMClosedPlan(poses=props[best], proposals=props, scores=scores, best=best))
    return out


def plan(ctx, protocol: Protocol = DEFAULT, version: str = "v2") -> PDMClosedPlan:
    """Run PDM-Closed on one scene context."""
    return plan_batch([ctx], protocol, version)[0]
