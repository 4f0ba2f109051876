"""One simulated episode: its plan, its rollout in highway-env, and its cut into 2 Hz ScenePool rows.

An episode is a log. It is recorded at the policy frequency (2 Hz, the scene rate) while highway-env
integrates at SIM_HZ (world.py makes the env and ticks it, as for closed-loop evaluation). Recording starts
after WARMUP_S seconds of simulation, so the spawn transient (vehicles placed at arbitrary speeds and gaps,
braking and accelerating hard to settle) is in no scene. With `scenes` scenes per episode and `stride` frames between them, frames
0 .. HISTORY + (scenes-1)*stride + FUTURE are simulated; the scene with current frame c holds frames
c-HISTORY .. c+FUTURE (1.5 s of history, 4 s of future) and renders of c-HISTORY .. c, so renders are
only drawn for frames some scene shows. If the ego crashes at frame k, only scenes with c < k are kept
(their future holds the crash and they are flagged `crash`). Ego accel / yaw_rate / accel_lat are the
simulator's own commands averaged over +-0.25 s around each frame (`smooth_signals`).

Route (map.route) of a scene: a connected chain of lanes in driving order, one lane per road segment
(highway-env edge (from, to)) along the ego's path: for each segment the lane the ego is in when it leaves
it, or at the scene's last frame (after a completed lane change, the lane it changed to; at a junction,
where highway-env's nearest lane flickers between crossing lanes, the lane it follows), then the lanes
highway-env will follow after the last frame (`drivers.path_ahead`, ROUTE_AHEAD_M). A lane that does
not lead into the next one (a lane change in a later segment) is replaced by its neighbour that does, a
junction gap is bridged by its connector, and the chain is cut where nothing connects
(`export.route_chain`). Every lane of a route segment is on_route (`export.export_road`).

The plan of episode i depends only on (seed, i, envs, synthetic fraction, image settings), never on how
many scenes are asked for, so a pool can be extended later without touching finished episodes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets_cfg.schema import EGO_FIELDS, new_row
from datasets_cfg.sim import drivers
from datasets_cfg.sim.annotate import annotate
from datasets_cfg.sim.command import driving_command
from datasets_cfg.sim.export import (
    AGENT_RADIUS,
    REAR_AXLE_TO_CENTER,
    TrackIds,
    ego_state,
    export_road,
    export_vehicles,
    lane_id,
    route_chain,
    sample_road,
    yaw_rate_sim,
)
from datasets_cfg.sim.render import VIEW_METERS, apply_effects, image_stats, render, save_image, setup_viewer
from datasets_cfg.sim.safety import is_near_miss, scene_safety
from datasets_cfg.sim.world import DT, ENV_IDS, FREQUENCIES, SIM_HZ, SUBSTEPS, make_env, tick

DEFAULT_ENVS = ("highway", "merge", "roundabout", "intersection", "exit", "two-way", "u-turn")
HISTORY, FUTURE = 3, 8  # frames (DT apart) of history and future in a scene
WARMUP_S = 5.0  # s simulated before frame 0 (spawn transient)
ROUTE_AHEAD_M = 120.0  # m of route past the ego's target lane, recorded every frame
MAP_MARGIN_M = 80.0
TRAFFIC_PERTURBATIONS = ("dense_traffic", "sparse_traffic", "aggressive_drivers")
SCENARIO_PERTURBATIONS = ("cut_in", "hard_brake", "ego_lane_change", "work_zone", "render_shift")
PERTURBATIONS = TRAFFIC_PERTURBATIONS + SCENARIO_PERTURBATIONS
EVENTS = ("cut_in", "hard_brake", "ego_lane_change")
# traffic density: config overrides where the env exposes a count, else vehicles are added / removed
DENSITY_CONFIG = {
    "highway": {"dense": {"vehicles_count": 80, "vehicles_density": 1.8}, "sparse": {"vehicles_count": 20, "vehicles_density": 0.5}},
    "exit": {"dense": {"vehicles_count": 35, "vehicles_density": 1.8}, "sparse": {"vehicles_count": 8, "vehicles_density": 0.5}},
    "intersection": {"dense": {"initial_vehicle_count": 16, "spawn_probability": 0.95}, "sparse": {"initial_vehicle_count": 4, "spawn_probability": 0.25}},
}
NIGHT_P, RAIN_P = 0.25, 0.25
WEYL = 0.6180339887498949  # golden-ratio sequence: real/synthetic assignment with the exact long-run fraction


@dataclass
class EpisodePlan:
    index: int
    log_name: str
    env: str
    seed: int  # highway-env reset seed
    source: str
    ego_policy: str
    density: str  # "default" | "dense" | "sparse"
    lighting: str
    weather: str
    perturbations: tuple = ()
    event_frame: int = -1
    render_shift: dict | None = None
    scenes: int = 10
    stride: int = 1
    image_size: int = 224
    pixels_per_meter: float = 224 / VIEW_METERS
    image_format: str = "auto"  # "png" | "jpg" | "auto" (PNG; JPEG when night/rain/shift noise makes PNG large)
    destination: str = field(default="")  # intersection exit ("" = env default)


def plan_episode(seed: int, index: int, envs, synthetic_fraction: float, scenes: int = 10, stride: int = 1,
                 image_size: int = 224, image_format: str = "auto") -> EpisodePlan:
    """The deterministic plan of episode `index` (see module doc)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 11]))
    env = envs[index % len(envs)]
    phase = (int(seed) * 0.7548776662466927) % 1.0
    source = "synthetic" if ((index + 1) * WEYL + phase) % 1.0 < synthetic_fraction else "real"
    lighting = "night" if rng.uniform() < NIGHT_P else "day"
    weather = "rainy" if rng.uniform() < RAIN_P else "sunny"
    env_seed = int(rng.integers(2**31 - 1))
    ego_policy = "cautious" if rng.uniform() < 0.35 else "idm_mobil"
    destination = str(rng.choice(["o1", "o2", "o3"])) if env == "intersection" else ""
    perts: tuple = ()
    density, shift, event_frame = "default", None, -1
    if source == "synthetic":
        # one change to the traffic, plus one rare manoeuvre or domain-shifted render
        perts = (TRAFFIC_PERTURBATIONS[int(rng.integers(len(TRAFFIC_PERTURBATIONS)))],
                 SCENARIO_PERTURBATIONS[int(rng.integers(len(SCENARIO_PERTURBATIONS)))])
        density = "dense" if "dense_traffic" in perts else "sparse" if "sparse_traffic" in perts else "default"
        if "aggressive_drivers" in perts:
            ego_policy = "aggressive"
        event_frame = int(rng.integers(HISTORY, HISTORY + max(2, scenes // 2)))
        if "render_shift" in perts:
            shift = {"zoom": float(rng.choice([0.75, 1.3])), "gains": [round(float(g), 3) for g in rng.uniform(0.7, 1.3, 3)],
                     "gamma": round(float(rng.uniform(0.7, 1.4)), 3)}
    ppm = image_size / VIEW_METERS * (shift["zoom"] if shift else 1.0)
    return EpisodePlan(index, f"sim-s{seed}-e{index:06d}", env, env_seed, source, ego_policy, density, lighting, weather,
                       perts, event_frame, shift, scenes, stride, image_size, ppm, image_format, destination)


def can_signals(ego) -> tuple[float, float]:
    """(accel, yaw rate in the global frame) the simulator integrated over its last step."""
    return float(ego.action.get("acceleration", 0.0)), -yaw_rate_sim(ego)


def smooth_signals(frames: list[dict], signals: list[tuple]) -> None:
    """Replace each frame's accel / yaw_rate / accel_lat by their mean over the simulator steps within
    +-0.25 s of the frame (end steps half-weighted): the 2 Hz CAN-like signals are anti-aliased averages of
    the 10 Hz commands rather than one noisy sample (steering settles within ~0.2 s). The first and last
    frames of an episode average the steps available on one side."""
    if not signals:
        return
    sig = np.asarray(signals, dtype=np.float64)
    for f, rec in enumerate(frames):
        dt = np.abs(sig[:, 0] - f * DT)
        w = np.where(dt < 0.25 - 1e-9, 1.0, np.where(dt < 0.25 + 1e-9, 0.5, 0.0))
        if w.sum() == 0:
            continue
        acc, yaw = (w @ sig[:, 1:]) / w.sum()
        rec["ego"].update(accel=float(acc), yaw_rate=float(yaw), accel_lat=float(rec["ego"]["speed"] * yaw))


class EpisodeRunner:
    """Runs episode plans; keeps one highway-env instance per environment type (reset per episode)."""

    def __init__(self):
        self._envs: dict = {}
        self._defaults: dict = {}

    def env(self, name: str):
        if name not in self._envs:
            env = make_env(name, render=True)
            self._envs[name] = env
            self._defaults[name] = dict(env.unwrapped.config)
        return self._envs[name]

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()

    # ------------------------------------------------------------------------------------------
    def run(self, plan: EpisodePlan, out_dir: Path) -> list[dict]:
        """Simulate the episode, write its renders under out_dir/images/<log_name>/, return its scene rows."""
        drivers.restore_class_params()
        env = self.env(plan.env)
        u = env.unwrapped
        config = dict(self._defaults[plan.env])
        config.update({**FREQUENCIES, "offscreen_rendering": True})
        config.update(DENSITY_CONFIG.get(plan.env, {}).get(plan.density, {}))
        if plan.destination:
            config["destination"] = plan.destination
        env.reset(seed=plan.seed, options={"config": config})
        rng = np.random.default_rng(np.random.SeedSequence([plan.seed, plan.index, 23]))
        applied: list[str] = []

        drivers.install_ego(env, plan.ego_policy, plan.env)
        if plan.density != "default" and plan.env not in DENSITY_CONFIG:
            n_others = len(drivers.others(env))
            if plan.density == "dense":
                drivers.add_traffic(env, max(3, n_others), rng)
            else:
                drivers.thin_traffic(env, 0.5, rng)
        if plan.density != "default":
            applied.append(f"{plan.density}_traffic")
        drivers.cull_far_vehicles(env)
        drivers.apply_conditions(env, plan.weather, plan.lighting, "aggressive_drivers" in plan.perturbations)
        if "aggressive_drivers" in plan.perturbations:
            applied.append("aggressive_drivers")
        if "work_zone" in plan.perturbations and drivers.work_zone(env, rng):
            applied.append("work_zone")
        if plan.render_shift:
            applied.append("render_shift")
        setup_viewer(env, plan.image_size, plan.pixels_per_meter)
        noisy = plan.lighting == "night" or plan.weather == "rainy" or bool(plan.render_shift)
        fmt = plan.image_format if plan.image_format != "auto" else ("jpg" if noisy else "png")
        lanes = sample_road(env, plan.env)

        last_current = HISTORY + (plan.scenes - 1) * plan.stride
        n_frames = last_current + FUTURE + 1
        track_ids, frames, signals = TrackIds(), [], []
        crash_frame, braking, release_at = None, None, -1
        warmup = int(round(WARMUP_S / DT))
        for f in range(-warmup, 0):
            self._advance(env, plan, f, signals)
        for f in range(n_frames):
            st = ego_state(env)
            # the lane the ego drives in for the route: its lane during a lane change (the lane it is in when it
            # leaves a segment), else the lane it follows (highway-env's nearest lane flickers at junctions)
            here, target = u.vehicle.lane_index, u.vehicle.target_lane_index
            on = here if here is not None and here[:2] == target[:2] else target
            st["route_lane_id"] = lane_id(on)
            st["path"] = [lane_id(p[0]) for p in drivers.path_ahead(u.vehicle, ROUTE_AHEAD_M, None if on == target else on) if p[0] is not None]
            rec = {"ego": st, "agents": export_vehicles(env, f, track_ids, AGENT_RADIUS), "image": None}
            if st["crashed"] and crash_frame is None:
                crash_frame = f
            if f <= last_current and crash_frame is None:
                img, tf = render(env)
                frame_rng = np.random.default_rng(np.random.SeedSequence([plan.seed, plan.index, f, 31]))
                img = apply_effects(img, plan.lighting, plan.weather, plan.render_shift, frame_rng)
                rel = f"images/{plan.log_name}/{f:03d}.{fmt}"
                save_image(img, Path(out_dir) / rel, fmt)
                rec["image"] = {"path": rel, "center": list(tf.center_xy), "stats": image_stats(img)}
            frames.append(rec)
            if f == n_frames - 1 or (crash_frame is not None and f >= crash_frame - 1 + FUTURE):
                break
            if f == plan.event_frame:
                done, braking = self._event(env, plan, rng)
                applied += done
                release_at = f + 5 if braking is not None else -1  # brake for 2.5 s, then drive on
            if f == release_at:
                drivers.release_brake(braking)
            self._advance(env, plan, f, signals)
        smooth_signals(frames, signals)
        rows = []
        for c in range(HISTORY, last_current + 1, plan.stride):
            if (crash_frame is not None and c >= crash_frame) or c + FUTURE >= len(frames):
                break
            rows.append(self._scene(plan, frames, c, lanes, crash_frame, applied))
        return rows

    @staticmethod
    def _advance(env, plan: EpisodePlan, f: int, signals: list) -> None:
        """Simulate from frame f to f + 1 (SUBSTEPS ticks), appending (time, accel, yaw rate) of the ego per tick."""
        u = env.unwrapped
        for k in range(SUBSTEPS):
            tick(env, plan.env, f * SUBSTEPS + k + 1)  # ticks counted from frame 0
            signals.append((f * DT + (k + 0.5) / SIM_HZ, *can_signals(u.vehicle)))

    @staticmethod
    def _event(env, plan: EpisodePlan, rng) -> tuple[list[str], object]:
        """Trigger the plan's scripted events now; returns the names that happened and the braking vehicle."""
        done, braking = [], None
        for ev in (p for p in plan.perturbations if p in EVENTS):
            if ev == "cut_in" and drivers.cut_in(env):
                done.append("cut_in")
            elif ev == "hard_brake":
                braking = drivers.hard_brake(env)
                if braking is not None:
                    done.append("hard_brake")
            elif ev == "ego_lane_change" and drivers.ego_lane_change(env, rng):
                done.append("ego_lane_change")
        return done, braking

    # ------------------------------------------------------------------------------------------
    def _scene(self, plan: EpisodePlan, frames: list[dict], c: int, lanes, crash_frame, applied) -> dict:
        span = range(c - HISTORY, c + FUTURE + 1)
        first = span[0]
        ego = {k: [] for k in EGO_FIELDS}
        for f in span:
            st = frames[f]["ego"]
            ego["t"].append(round((f - c) * DT, 6))
            for k in EGO_FIELDS[1:]:
                ego[k].append(st[k])
        agents = {k: [] for k in ("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy")}
        appearance = {}
        for f in span:
            a = frames[f]["agents"]
            for k in agents:
                agents[k] += [f - first for _ in a["frame"]] if k == "frame" else a[k]
            appearance.update(zip(a["track_id"], a["color"]))
        visited = []  # lanes the simulator put the ego on, in order (for the lane-change tag)
        for f in span:
            lid = frames[f]["ego"]["lane_id"]
            if lid and (not visited or visited[-1] != lid):
                visited.append(lid)
        route = route_chain(lanes, [frames[f]["ego"]["route_lane_id"] for f in span] + frames[span[-1]]["ego"]["path"],
                            anchor=frames[c]["ego"]["route_lane_id"])
        xy = np.array([[frames[f]["ego"]["x"], frames[f]["ego"]["y"]] for f in span])
        region = (*(xy.min(0) - MAP_MARGIN_M), *(xy.max(0) + MAP_MARGIN_M))
        imaged = [f for f in range(c - HISTORY, c + 1)]
        crash = crash_frame is not None and crash_frame <= span[-1]
        meta = {
            "log_name": plan.log_name, "timestamp_s": round(c * DT, 6), "warmup_s": WARMUP_S, "env": plan.env, "env_id": ENV_IDS[plan.env],
            "episode_index": plan.index, "episode_seed": plan.seed, "density": plan.density, "ego_policy": plan.ego_policy,
            "other_drivers": "aggressive_idm" if "aggressive_drivers" in plan.perturbations else "idm_default",
            "perturbations": sorted(set(applied)), "planned_perturbations": list(plan.perturbations),
            "event_time_s": round(plan.event_frame * DT, 6) if plan.event_frame >= 0 else None,
            "render_shift": plan.render_shift,
            "simulated_attributes": {"lighting": plan.lighting, "weather": plan.weather,
                                     "note": "highway-env has no weather or lighting: these tags, their render effects and driver reactions are simulated by datasets_cfg.sim"},
            "ego_size": {"length": frames[c]["ego"]["length"], "width": frames[c]["ego"]["width"], "rear_axle_to_center": REAR_AXLE_TO_CENTER},
            "render": {"frame_index": c - first, "camera": "bev", "pixels_per_meter": plan.pixels_per_meter,
                       "image_size": [plan.image_size, plan.image_size], "centering": [0.5, 0.5], "y_axis": "up",
                       "center_xy": frames[c]["image"]["center"],
                       "frames": {str(f - first): frames[f]["image"]["center"] for f in imaged}},
            "image_stats": frames[c]["image"]["stats"],
            "appearance": appearance,
            "crash_time_s": round(crash_frame * DT, 6) if crash_frame is not None else None,
        }
        tags = [plan.env, plan.source] + sorted(set(applied))
        tags += [t for t, on in (("night", plan.lighting == "night"), ("rain", plan.weather == "rainy")) if on]
        row = new_row(
            f"{plan.log_name}-f{c:03d}", "sim", "train", source=plan.source, location=plan.env, weather=plan.weather,
            lighting=plan.lighting, dt=DT, current_index=HISTORY, ego=ego, agents=agents,
            map=export_road(lanes, region, route, env_name=plan.env), crash=bool(crash),
            images=[{"frame": f - first, "camera": "bev", "path": frames[f]["image"]["path"]} for f in imaged],
        )
        row["meta"] = json.dumps(meta)
        safety = scene_safety(row, meta["ego_size"]["length"], meta["ego_size"]["width"])
        row["near_miss"] = is_near_miss(safety, row["crash"])
        row["command"] = driving_command(row)
        meta["safety"] = safety
        if any(r.split("#")[0] == visited[0].split("#")[0] and r != visited[0] for r in visited[1:]):
            tags.append("lane_change")
        tags += [t for t, on in (("near_miss", row["near_miss"]), ("crash", row["crash"])) if on]
        row["tags"] = tags
        row["meta"] = json.dumps(meta)
        from datasets_cfg.schema import Scene

        future = Scene(row).future_trajectory(FUTURE, DT, frame="ego")
        qa_rng = np.random.default_rng(np.random.SeedSequence([plan.seed, plan.index, c, 47]))
        row["qa"] = annotate(row, future, qa_rng)
        return row
