"""The sub-metrics on simulated ego states, for P trajectories of one scene at once.

`states` are (P, T, 11) rear-axle states every 0.1 s (T = 41: t = 0 .. 4 s). Collision-like checks are
vectorised over (proposal, step, object): a cheap circle pre-filter, then a separating-axis box test on the
remaining pairs. The devkit's order-dependent rules ("a not-at-fault object is ignored for the rest of the
horizon") reduce to "the first contact with each object decides", which is what we compute.
"""
from __future__ import annotations

import numpy as np
import shapely

from eval.navsim.config import HEADING, VX, VY, Protocol, X, Y
from eval.navsim.geometry import boxes_intersect, ego_boxes, relative_angle, segments_intersect_boxes
from eval.navsim.observation import Observation


class EgoGeometry:
    """Ego boxes and area flags of (P, T) states, computed once and shared by the metrics."""

    def __init__(self, states: np.ndarray, ctx, protocol: Protocol):
        veh = ctx.vehicle
        self.states = states
        self.corners, self.centers = ego_boxes(states, veh)
        self.rear = states[..., [X, Y]]
        self.heading = states[..., HEADING]
        self.speed = np.hypot(states[..., VX], states[..., VY])
        self.radius = 0.5 * np.hypot(veh.length, veh.width)
        self.flags = ctx.map.area_flags(self.corners, self.centers, self.rear)


def _within(a: np.ndarray, b: np.ndarray, r) -> np.ndarray:
    """|a - b| <= r for broadcast (..., 2) points (component-wise: much faster than a norm over a size-2 axis)."""
    dx = a[..., 0] - b[..., 0]
    dy = a[..., 1] - b[..., 1]
    return dx * dx + dy * dy <= np.square(r)


def _first_per_pair(p: np.ndarray, n: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """Indices of the earliest (by order_key) entry for every distinct (p, n) pair."""
    if len(p) == 0:
        return np.zeros(0, np.int64)
    o = np.lexsort((order_key, n, p))
    ps, ns = p[o], n[o]
    first = np.r_[True, (ps[1:] != ps[:-1]) | (ns[1:] != ns[:-1])]
    return o[first]


def no_at_fault_collisions(g: EgoGeometry, obs: Observation, protocol: Protocol) -> np.ndarray:
    """NC per proposal: 0 (at-fault with an agent), 0.5 (at-fault with a static object) or 1."""
    sp = protocol.scorer
    P, T = g.speed.shape
    nc = np.ones(P)
    if obs.valid.shape[1] == 0:
        return nc
    ox, oc, ov = obs.xy[:T], obs.corners[:T], obs.valid[:T]
    near = _within(g.centers[:, :, None], ox[None], g.radius + obs.radius[None, None])
    p, t, n = np.nonzero(ov[None] & near)
    hit = boxes_intersect(g.corners[p, t], oc[t, n])
    p, t, n = p[hit], t[hit], n[hit]
    if len(p) == 0:
        return nc
    ego_stopped = g.speed[p, t] <= sp.ego_stopped_speed
    behind = relative_angle(g.rear[p, t], g.heading[p, t], ox[t, n]) > np.deg2rad(sp.rear_angle_deg)
    front = segments_intersect_boxes(g.corners[p, t, 0], g.corners[p, t, 1], oc[t, n])
    lateral_at_fault = g.flags["multiple_lanes"][p, t] | g.flags["non_drivable"][p, t]
    # object stopped: not an agent, or an agent whose speed at this step is <= 0.05 m/s (nuPlan's is_track_stopped,
    # nuplan-devkit nuplan/planning/simulation/observation/idm/utils.py:191-202, called at
    # navsim .../pdm_planner/scoring/pdm_scorer_utils.py:44 on the interpolated object of that step)
    v = obs.velocity[t, n]
    obj_stopped = ~obs.is_agent[n] | (np.hypot(v[:, 0], v[:, 1]) <= sp.track_stopped_speed)
    at_fault = ~ego_stopped & (obj_stopped | (~behind & (front | lateral_at_fault)))
    first = _first_per_pair(p, n, t)
    fp, fn, fault = p[first], n[first], at_fault[first]
    penalty = np.where(obs.is_agent[fn], 0.0, 0.5)
    np.minimum.at(nc, fp[fault], penalty[fault])
    return nc


def drivable_area_compliance(g: EgoGeometry) -> np.ndarray:
    return np.where(g.flags["non_drivable"].any(axis=1), 0.0, 1.0)


def driving_direction_compliance(g: EgoGeometry, protocol: Protocol, exclude_intersections: bool = True) -> np.ndarray:
    """DDC: centre displacement while outside on-route lanes, summed over a 1 s window; worst window decides."""
    sp = protocol.scorer
    step = np.zeros(g.speed.shape)
    step[:, 1:] = np.linalg.norm(np.diff(g.centers, axis=1), axis=-1)
    mask = g.flags["oncoming"]
    if exclude_intersections:
        mask = mask & ~g.flags["center_in_intersection"]
    step = np.where(mask, step, 0.0)
    w = int(sp.driving_direction_horizon / sp.dt)
    cs = np.concatenate([np.zeros((len(step), 1)), np.cumsum(step, axis=1)], axis=1)
    idx = np.arange(step.shape[1])
    window = cs[:, idx + 1] - cs[:, np.maximum(idx - w, 0)]  # steps t-w .. t
    worst = window.max(axis=1)
    return np.where(worst < sp.driving_direction_compliance_threshold, 1.0, np.where(worst < sp.driving_direction_violation_threshold, 0.5, 0.0))


def traffic_light_compliance(g: EgoGeometry, obs: Observation) -> np.ndarray:
    """TLC: 0 if the ego box ever touches an on-route lane connector while its light is red."""
    P, T = g.speed.shape
    if len(obs.red_lights) == 0 or not obs.red_active[:T].any():
        return np.ones(P)
    polys = shapely.polygons(g.corners)  # (P, T)
    hit = shapely.intersects(polys[:, :, None], obs.red_lights.geoms[None, None, :]) & obs.red_active[None, :T]
    return np.where(hit.any(axis=(1, 2)), 0.0, 1.0)


def progress(g: EgoGeometry, centerline) -> np.ndarray:
    """Raw progress [m]: box-centre displacement from start to end projected on the route centreline, >= 0."""
    s, _ = centerline.project(np.stack([g.centers[:, 0], g.centers[:, -1]], axis=1))
    return np.clip(s[:, 1] - s[:, 0], 0.0, None)


def time_to_collision(g: EgoGeometry, obs: Observation, protocol: Protocol, last_step: int | None) -> np.ndarray:
    """TTC within bound: project the ego box forward at constant speed by 0, 0.3, 0.6, 0.9 s and test it against
    objects at the matching future step; fail on an object ahead, or one not behind while the ego is in
    multiple lanes / off the drivable area / in an intersection. Steps 0..last_step (None: all)."""
    sp = protocol.scorer
    P, T = g.speed.shape
    ttc = np.ones(P)
    N = obs.valid.shape[1]
    offsets = np.arange(0, int(round(sp.ttc_horizon / sp.dt)), sp.ttc_stride)  # 0, 3, 6, 9
    n_steps = T if last_step is None else min(T, last_step + 1)
    n_steps = min(n_steps, obs.num_steps - offsets[-1])
    if N == 0 or n_steps <= 0:
        return ttc
    ts = np.arange(n_steps)
    shift = (g.speed[:, ts, None] * (offsets * sp.dt)[None, None])[..., None] * np.stack([np.cos(g.heading[:, ts]), np.sin(g.heading[:, ts])], -1)[:, :, None]
    centers = g.centers[:, ts, None] + shift  # (P, S, K, 2)
    tk = ts[:, None] + offsets[None]  # (S, K) object step
    moving = g.speed[:, ts] >= sp.ttc_stopped_speed
    cand = _within(centers[:, :, :, None], obs.xy[tk][None], g.radius + obs.radius) & obs.valid[tk][None] & moving[:, :, None, None]  # (P, S, K, N)
    p, s, k, n = np.nonzero(cand)
    if len(p) == 0:
        return ttc
    boxes = g.corners[p, s] + shift[p, s, k][:, None, :]
    hit = boxes_intersect(boxes, obs.corners[tk[s, k], n])
    p, s, k, n = p[hit], s[hit], k[hit], n[hit]
    if len(p) == 0:
        return ttc
    obj_xy = obs.xy[tk[s, k], n]
    ang = relative_angle(g.rear[p, s], g.heading[p, s], obj_xy)
    risky_area = g.flags["multiple_lanes"][p, s] | g.flags["non_drivable"][p, s] | g.flags["rear_in_intersection"][p, s]
    # ahead within 30 deg (nuPlan's is_agent_ahead default, nuplan-devkit .../observation/idm/utils.py:33-41, as
    # navsim pdm_scorer.py:566 calls it), or not behind (> 150 deg) while in a risky area
    fail = (ang < np.deg2rad(sp.ahead_angle_deg)) | (risky_area & ~(ang > np.deg2rad(sp.rear_angle_deg)))
    first = _first_per_pair(p, n, s * len(offsets) + k)
    ttc[p[first][fail[first]]] = 0.0
    return ttc


def lane_keeping(g: EgoGeometry, centerline, protocol: Protocol) -> np.ndarray:
    """LK: 0 if the box centre is > 0.5 m from the route centreline for 20 consecutive steps; steps inside an
    intersection are skipped (they neither count nor reset the run)."""
    sp = protocol.scorer
    _, dist = centerline.project(g.centers)
    exceed = dist > sp.lane_keeping_deviation_limit
    skip = g.flags["center_in_intersection"]
    need = int(np.ceil(sp.lane_keeping_horizon_window / sp.dt))
    count = np.cumsum(exceed & ~skip, axis=1)
    reset = ~exceed & ~skip
    T = exceed.shape[1]
    last_reset = np.maximum.accumulate(np.where(reset, np.arange(T)[None], -1), axis=1)
    base = np.where(last_reset >= 0, np.take_along_axis(count, np.maximum(last_reset, 0), axis=1), 0)
    run = count - base
    return np.where((run >= need).any(axis=1), 0.0, 1.0)


def submetrics(states: np.ndarray, ctx, obs: Observation, protocol: Protocol, version: str = "v2", history: np.ndarray | None = None) -> dict:
    """All trajectory-level sub-metrics of P runs of one scene (EP raw, not yet normalised; no EC).

    v2: NC, DAC, DDC (intersections excluded), TLC, TTC on steps 0..31, LK, HC. HC prepends `history`; with
    history None it is 1, as upstream when no past trajectory is passed (PDM-Closed's own proposals and the
    human-filter run).
    v1: NC, DAC, DDC (weight 0), TTC on all steps, comfort C (v1.1 windows, no history).
    """
    from eval.navsim import comfort

    g = EgoGeometry(states, ctx, protocol)
    sp, cp, veh = protocol.scorer, protocol.comfort, ctx.vehicle
    out = {
        "no_at_fault_collisions": no_at_fault_collisions(g, obs, protocol),
        "drivable_area_compliance": drivable_area_compliance(g),
        "driving_direction_compliance": driving_direction_compliance(g, protocol, exclude_intersections=version == "v2"),
        "progress_raw": progress(g, ctx.centerline),
    }
    if version == "v2":
        out["traffic_light_compliance"] = traffic_light_compliance(g, obs)
        out["time_to_collision_within_bound"] = time_to_collision(g, obs, protocol, sp.ttc_last_step_v2)
        out["lane_keeping"] = lane_keeping(g, ctx.centerline, protocol)
        out["history_comfort"] = np.ones(len(states)) if history is None else comfort.history_comfort(states, history, sp.dt, veh, cp)
    elif version == "v1":
        out["time_to_collision_within_bound"] = time_to_collision(g, obs, protocol, None)
        out["comfort"] = np.where(comfort.comfort_checks_v1(states, sp.dt, cp).all(-1), 1.0, 0.0)
    else:
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    return out
