"""Closed-loop rollouts: drive a planner in highway-env and report how the drive went.

    result = run_closed_loop(planner, envs=("highway", "merge"), episodes=4, seed=0)
    result.means["epdms"], result.means["crash_rate"], result.episodes[0]

A planner is any callable `planner(observation) -> (N, 3) poses` (x, y, heading in the current ego
rear-axle frame at `interval`, 2*`interval`, ... s; NAVSIM's default 8 x 0.5 s). The observation is a
`datasets_cfg.schema.Scene` of the current state built with the simulator's own world module
(`datasets_cfg.sim.world`: the env, its tick and its export, shared with `mose simulate`): 1.5 s of ego /
agent history at 2 Hz (current frame last, no future), the road network around the ego as lane and
drivable-area polygons, the route (the lane chain ahead of the ego), and the driving command read from the
route (`datasets_cfg.sim.command.route_command`: left / straight / right; the same command the fast pilot's
planner adapter gives its pilot).

Every 0.5 s the planner is asked for a trajectory; the ego follows it for 0.5 s with NAVSIM's LQR tracker on
the kinematic bicycle model (eval.navsim.simulate), whose states are written into highway-env's ego each
0.1 s; the other vehicles then act and move (they react to the ego) and highway-env detects collisions.
An episode ends at `duration_s` or at a crash. Reported per episode:

- crashed / crash_time_s: highway-env's collision flag on the ego;
- offroad: some ego box corner left the drivable area (the scorer's DAC test) at some 0.1 s step;
- progress_m and route_completion: progress along the route centreline the episode started on, over the
  distance the lane's speed limit (20 m/s if unknown) allows in `duration_s` (capped by the route's length
  ahead), clipped to 1;
- comfort: fraction of the executed trajectory's 4 s windows (every 0.5 s) inside all six NAVSIM comfort
  bounds;
- epdms: the episode's score. A crashed episode (it ended in a collision, before `duration_s`) scores 0 (OURS:
  a crash is a failed drive, whatever the seconds before it were worth). Otherwise the mean EPDMS of the
  executed trajectory, scored like NAVSIM scores a human: the episode is cut into scenes (1.5 s history, 4 s
  future, 2 Hz) whose logged future is what the ego did, against the agents as they actually moved (human
  filter off: the executed drive is what is judged); NaN (unscored) when the episode is too short for one
  scene (`duration_s` under 5.5 s). `epdms_scenes_mean` keeps the mean over the scored scenes, crashed or not;
- planner_failures: decisions where the planner raised or returned unusable poses (the ego then brakes
  along its current heading).
`ClosedLoopResult.means` averages them (rates for the booleans; `episode_means`). Its "epdms" is the mean of the
episodes' scores, a crash counting 0 and never skipped; unscored episodes (too short, not crashed) are left out
and counted ("epdms_unscored"), the crashes are counted too ("crashes").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from common.geometry import local_to_global
from datasets_cfg.schema import EGO_FIELDS, Scene, new_row, validate_row
from datasets_cfg.sim.command import driving_command, route_command
from datasets_cfg.sim.world import (
    DT,
    FREQUENCIES,
    REAR_AXLE_TO_CENTER,
    SUBSTEPS,
    SimWarnings,
    TrackIds,
    capture_sim_warnings,
    ego_lane_speed_limit,
    ego_state,
    export_road,
    export_vehicles,
    hold_ego,
    make_env,
    place_ego,
    route_ahead,
    sample_road,
    tick,
)
from eval.navsim import comfort as comfort_mod
from eval.navsim.config import AX, DEFAULT, HEADING, VX, YAW_RATE, Protocol, X, Y
from eval.navsim.geometry import PolygonSet, Polyline, ego_boxes
from eval.navsim.simulate import initial_state, interpolate_poses, track

Planner = Callable[[Scene], np.ndarray]
HISTORY, FUTURE = 3, 8  # decisions (DT apart) of history and future in a scored scene
MAP_MARGIN_M = 80.0
ROUTE_AHEAD_M = 300.0


@dataclass
class ClosedLoopResult:
    episodes: list[dict] = field(default_factory=list)
    means: dict = field(default_factory=dict)
    sim_warnings: SimWarnings = field(default_factory=SimWarnings)  # highway-env's warnings, counted (world.py)

    def to_dict(self) -> dict:
        return {"means": self.means, "episodes": self.episodes, "sim_warnings": self.sim_warnings.to_dict()}

    def to_json(self, path) -> None:
        from common.atomic import write_json

        write_json(path, self.to_dict())


# ----------------------------------------------------------------------------------------------
# planners usable out of the box


def constant_velocity_planner(num_poses: int = 8, interval: float = 0.5) -> Planner:
    def plan(obs: Scene) -> np.ndarray:
        return next(iter(_agent("constant_velocity", [obs], num_poses, interval).values()))

    return plan


def pdm_closed_planner(num_poses: int = 8, interval: float = 0.5) -> Planner:
    def plan(obs: Scene) -> np.ndarray:
        out = _agent("pdm_closed", [obs], num_poses, interval)
        if obs.id not in out:
            raise ValueError(f"PDM-Closed cannot plan on {obs.id} (no map or route)")
        return out[obs.id]

    return plan


def _agent(name, scenes, num_poses, interval):
    from eval.navsim.agents import run_agent

    return run_agent(name, scenes, num_poses, interval)


# ----------------------------------------------------------------------------------------------
# the simulator side


def _make_env(name: str, seed: int):
    env = make_env(name, config=FREQUENCIES)
    env.reset(seed=int(seed))
    return env


class _Episode:
    """One rollout: the env, the ego state we integrate, and the 2 Hz / 10 Hz records."""

    def __init__(self, env_name: str, seed: int, protocol: Protocol):
        self.name, self.seed, self.protocol = env_name, seed, protocol
        self.env = _make_env(env_name, seed)
        self.ego = hold_ego(self.env)  # our controller moves the ego; highway-env only checks its collisions
        self.lanes = sample_road(self.env, env_name)
        self.track_ids = TrackIds()
        self.size = {"length": float(self.ego.LENGTH), "width": float(self.ego.WIDTH), "rear_axle_to_center": REAR_AXLE_TO_CENTER}
        st = ego_state(self.env)
        self.state = initial_state(np.array([st["x"], st["y"], st["heading"]]), st["speed"], 0.0, 0.0, 0.0, protocol)
        self.frames: list[dict] = []
        self.states: list[np.ndarray] = [self.state.copy()]
        self.log_name = f"closed-loop-{env_name}-s{seed}"

    # ---- simulator I/O
    def step(self, s: np.ndarray, t: float) -> None:
        """Write the ego state `s` into the simulator, then tick it once (the other vehicles act and move)."""
        place_ego(self.env, s[[X, Y, HEADING]], s[VX])
        self.state = s
        self.states.append(s.copy())
        tick(self.env, self.name, len(self.states) - 1)  # ticks counted from the episode's start

    def record(self) -> None:
        """Append the current 2 Hz frame (ego, agents, route)."""
        s = self.state
        f = len(self.frames)
        agents = export_vehicles(self.env, f, self.track_ids)
        for k in ("color", "crashed"):
            agents.pop(k, None)
        ego = {"x": float(s[X]), "y": float(s[Y]), "heading": float(s[HEADING]), "speed": float(s[VX]), "accel": float(s[AX]),
               "accel_lat": float(s[VX] * s[YAW_RATE]), "yaw_rate": float(s[YAW_RATE])}
        route = route_ahead(self.env, ROUTE_AHEAD_M)
        self.frames.append({"ego": ego, "agents": agents, "route": route})

    # ---- ScenePool rows
    def row(self, first: int, current: int, last: int, id: str) -> dict:
        span = range(first, last + 1)
        ego = {k: [] for k in EGO_FIELDS}
        for f in span:
            ego["t"].append(round((f - current) * DT, 6))
            for k in EGO_FIELDS[1:]:
                ego[k].append(self.frames[f]["ego"][k])
        agents = {k: [] for k in ("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy")}
        for f in span:
            a = self.frames[f]["agents"]
            for k in agents:
                agents[k] += [f - first] * len(a["frame"]) if k == "frame" else list(a[k])
        xy = np.array([[self.frames[f]["ego"]["x"], self.frames[f]["ego"]["y"]] for f in span])
        region = (*(xy.min(0) - MAP_MARGIN_M), *(xy.max(0) + MAP_MARGIN_M))
        route = self.frames[current]["route"]
        meta = {"log_name": self.log_name, "timestamp_s": round(current * DT, 6), "env": self.name, "ego_size": self.size, "closed_loop": True}
        row = new_row(id, "sim", "closed_loop", source="synthetic", location=self.name, dt=DT, current_index=current - first, ego=ego,
                      agents=agents, map=export_road(self.lanes, region, route, env_name=self.name), meta=json.dumps(meta))
        # the command a planner is given: from the driven future where the row has one (scoring), else from the route
        row["command"] = driving_command(row) if last > current else route_command(row)
        validate_row(row, f"closed loop {id}")
        return row

    def observation(self) -> Scene:
        c = len(self.frames) - 1
        return Scene(self.row(max(0, c - HISTORY), c, c, f"{self.log_name}-f{c:03d}"))


# ----------------------------------------------------------------------------------------------
# the loop


def _fallback(state: np.ndarray, num_poses: int, interval: float) -> np.ndarray:
    """Brake at 4 m/s^2 along the current heading (used when the planner fails)."""
    t = np.arange(1, num_poses + 1) * interval
    v = max(float(state[VX]), 0.0)
    t_stop = v / 4.0
    tc = np.minimum(t, t_stop)
    return np.stack([v * tc - 2.0 * tc**2, 0 * t, 0 * t], -1)


def _valid(poses, num_poses: int) -> bool:
    try:
        a = np.asarray(poses, float)
    except (TypeError, ValueError):
        return False
    return a.shape == (num_poses, 3) and bool(np.isfinite(a).all())


def run_episode(planner: Planner, env_name: str, seed: int, duration_s: float = 15.0, num_poses: int = 8, interval: float = 0.5,
                protocol: Protocol = DEFAULT) -> dict:
    """Roll out one episode; returns its row (see the module docstring)."""
    ep = _Episode(env_name, seed, protocol)
    sp = protocol.scorer
    steps = int(round(sp.horizon_s / sp.dt))
    n_decisions = int(round(duration_s / DT))
    failures, crash_time, decisions = 0, None, 0
    start_route = _route_polyline(ep, route_ahead(ep.env, ROUTE_AHEAD_M))
    limit = ego_lane_speed_limit(ep.env) or 20.0
    for d in range(n_decisions):
        ep.record()
        if ep.ego.crashed:
            crash_time = d * DT
            break
        obs = ep.observation()
        decisions += 1
        try:
            poses = planner(obs)
            ok = _valid(poses, num_poses)
        except Exception:  # a planner bug must not stop the evaluation; it is counted
            ok = False
        if not ok:
            failures += 1
            poses = _fallback(ep.state, num_poses, interval)
        pose = ep.state[[X, Y, HEADING]]
        ref = local_to_global(interpolate_poses(np.asarray(poses, float)[None], interval, steps, sp.dt)[0], pose)
        states = track(ref[None], ep.state[None], protocol, sp.dt)[0]
        for k in range(1, SUBSTEPS + 1):
            ep.step(states[k], (d * SUBSTEPS + k) * sp.dt)
            if ep.ego.crashed and crash_time is None:
                crash_time = d * DT + k * sp.dt
        if crash_time is not None:
            ep.record()
            break
    else:
        ep.record()
    executed = np.stack(ep.states)
    row = _summarise(ep, executed, start_route, float(limit), duration_s, crash_time, failures, len(ep.frames), protocol)
    row["decisions"] = decisions
    ep.env.close()
    return row


def _route_polyline(ep: _Episode, route: list) -> Polyline | None:
    from eval.navsim.context import route_centerline

    lanes = [{"id": ln.id, "centerline": ln.center.tolist()} for ln in ep.lanes]
    try:
        return route_centerline(lanes, route, ep.state[[X, Y, HEADING]])
    except Exception:
        return None


def _summarise(ep: _Episode, executed: np.ndarray, route: Polyline | None, limit: float, duration_s: float, crash_time, failures: int,
               n_frames: int, protocol: Protocol) -> dict:
    from eval.navsim.agents import human
    from eval.navsim.config import VehicleParams
    from eval.navsim.scorer import score_scenes

    sp, cp = protocol.scorer, protocol.comfort
    veh = VehicleParams(length=ep.size["length"], width=ep.size["width"], rear_axle_to_center=ep.size["rear_axle_to_center"],
                        front_length=ep.size["length"] / 2 + ep.size["rear_axle_to_center"], rear_length=ep.size["length"] / 2 - ep.size["rear_axle_to_center"])
    corners, _ = ego_boxes(executed, veh)
    drivable = PolygonSet([np.asarray(a["polygon"], float) for a in export_road(ep.lanes, None, (), env_name=ep.name)["areas"]])
    offroad = bool((~drivable.contains(corners).any(-1)).any())

    progress = math.nan
    completion = math.nan
    if route is not None:
        s, _ = route.project(executed[[0, -1]][:, [X, Y]])
        progress = float(max(s[1] - s[0], 0.0))
        target = min(limit * duration_s, route.length - s[0])
        completion = float(min(1.0, progress / target)) if target > 0 else math.nan

    # comfort of every 4 s window of the executed drive, every 0.5 s
    win = int(round(sp.horizon_s / sp.dt)) + 1
    starts = range(0, max(len(executed) - win + 1, 0), SUBSTEPS)
    windows = [executed[k:k + win] for k in starts]
    comfort = float(np.mean(comfort_mod.comfort_checks_v2(np.stack(windows), sp.dt, veh, cp).all(-1))) if windows else math.nan

    # EPDMS of the executed trajectory: the episode cut into NAVSIM-style scenes
    scenes = [Scene(ep.row(c - HISTORY, c, c + FUTURE, f"{ep.log_name}-f{c:03d}")) for c in range(HISTORY, n_frames - FUTURE)]
    rows = score_scenes(scenes, human(scenes), human_filter=False, protocol=protocol) if scenes else []
    scores = [r["score"] for r in rows if r["valid"]]
    scenes_mean = float(np.mean(scores)) if scores else math.nan
    crashed = crash_time is not None
    return {
        "env": ep.name, "seed": ep.seed, "decisions": 0, "duration_s": round((len(executed) - 1) * sp.dt, 3),
        "crashed": crashed, "crash_time_s": crash_time, "offroad": offroad, "progress_m": progress, "route_completion": completion,
        "comfort": comfort, "epdms": 0.0 if crashed else scenes_mean, "epdms_scenes_mean": scenes_mean, "epdms_scenes": len(scores),
        "planner_failures": failures,
    }


def run_closed_loop(planner: Planner, envs: Sequence[str] = ("highway",), episodes: int = 2, seed: int = 0, duration_s: float = 15.0,
                    num_poses: int = 8, interval: float = 0.5, protocol: Protocol = DEFAULT, progress: bool = False) -> ClosedLoopResult:
    """Run `episodes` episodes, cycling through `envs`; episode i uses env envs[i % len(envs)] and seed `seed + i`."""
    if isinstance(envs, str):
        envs = [e.strip() for e in envs.split(",") if e.strip()]
    if not envs or episodes < 1:
        raise ValueError("run_closed_loop: need at least one environment and one episode")
    it = range(episodes)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="closed loop", unit="episode")
    with capture_sim_warnings() as warned:  # counted, not printed per step; the caller reports the summary
        rows = [run_episode(planner, envs[i % len(envs)], seed + i, duration_s, num_poses, interval, protocol) for i in it]
    return ClosedLoopResult(episodes=rows, means=episode_means(rows), sim_warnings=warned)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def episode_score(row: dict) -> float:
    """An episode's EPDMS: 0 for a crash (whatever its row says: rows written before crashes scored 0 kept the
    scenes' mean), else its `epdms` (NaN when the episode was too short to score)."""
    if row.get("crashed"):
        return 0.0
    v = row.get("epdms")
    return math.nan if _missing(v) else float(v)


def episode_means(rows: list[dict]) -> dict:
    """Means over episodes: rates for the booleans, the episode score (`episode_score`: a crash is 0, never
    skipped) for "epdms", with the counts of crashed and unscored episodes next to it."""
    def avg(key):
        vals = [float(r[key]) for r in rows if not _missing(r.get(key))]
        return float(np.mean(vals)) if vals else math.nan

    scores = [episode_score(r) for r in rows]
    scored = [s for s in scores if not math.isnan(s)]
    return {
        "episodes": len(rows), "crash_rate": avg("crashed"), "offroad_rate": avg("offroad"), "route_completion": avg("route_completion"),
        "progress_m": avg("progress_m"), "comfort": avg("comfort"), "epdms": float(np.mean(scored)) if scored else math.nan,
        "crashes": int(sum(bool(r.get("crashed")) for r in rows)), "epdms_unscored": len(scores) - len(scored),
        "planner_failures": int(sum(r.get("planner_failures", 0) for r in rows)),
    }
