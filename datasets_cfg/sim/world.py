"""The highway-env world: make an environment, tick it, observe it. Shared by the scene generator
(`episode.EpisodeRunner`, behind `mose simulate`) and closed-loop evaluation (eval/closed_loop.py).

    env = make_env("highway", config=FREQUENCIES); env.reset(seed=0)
    for step in range(1, 11):            # 1 s
        tick(env, "highway", step)
    ego_state(env), export_vehicles(env, frame, track_ids), export_road(sample_road(env, "highway"), ...)

Time. highway-env integrates at SIM_HZ; scenes and planner decisions come every DT s (the policy frequency).
We never call `env.step` (it would run highway-env's own action model on the ego); `tick` does what it does
once per 1/SIM_HZ step instead: every vehicle acts and moves, the clock advances and, once per simulated
second, the intersection env clears vehicles that left and spawns new ones (what `IntersectionEnv.step`
does). Every 2 s vehicles too far to ever meet the ego are dropped (`drivers.cull_far_vehicles`). Those
periodic chores run when `step` (the number of the tick, counted from the caller's time origin: 1 for the
first tick after it, <= 0 during a warm-up before it) is a multiple of SPAWN_EVERY / CULL_EVERY.

Frames. Observations are in the ScenePool global frame with the ego at its rear axle (see export.py);
`place_ego` writes an ego pose given in those terms back into highway-env, for callers that drive the ego
themselves (`hold_ego`).

Simulator warnings. highway-env reports some conditions through its loggers, once per tick: e.g.
`highway_env/road/road.py` (RoadNetwork.next_lane) `logger.warning("Route {} does not start after current road
{}.")` for a vehicle whose planned route no longer matches its road, which printed 8,616 lines in one
`mose curate --method autoscale` run on 80 scenes (Python's last-resort handler prints a logger's warnings to
stderr when nobody configured logging). `capture_sim_warnings()` takes them over while a run drives the
simulator: counted per message (the values in parentheses elided, so one route's warning and another's count
together), nothing printed per step; the caller reports `SimWarnings.summary()` once (and `to_dict()` in its
results).
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from contextlib import contextmanager

import numpy as np

from datasets_cfg.sim.export import AGENT_RADIUS, REAR_AXLE_TO_CENTER, TrackIds, ego_state, export_road, export_vehicles, lane_id, sample_road

# the observation side of the world is export.py's, re-exported here
__all__ = ["SimWarnings", "capture_sim_warnings", "ENV_IDS", "DT", "SIM_HZ", "SUBSTEPS", "FREQUENCIES", "make_env", "tick", "hold_ego", "place_ego", "ego_lane_speed_limit", "route_ahead",
           "AGENT_RADIUS", "REAR_AXLE_TO_CENTER", "TrackIds", "ego_state", "export_road", "export_vehicles", "lane_id", "sample_road"]

ENV_IDS = {
    "highway": "highway-v0", "merge": "merge-v1", "roundabout": "roundabout-v1", "intersection": "intersection-v2",
    "exit": "exit-v1", "two-way": "two-way-v0", "u-turn": "u-turn-v1", "racetrack": "racetrack-v1",
}
DT, SIM_HZ = 0.5, 10  # s between scenes / decisions (highway-env's policy period); integration steps per second
SUBSTEPS = int(round(DT * SIM_HZ))  # ticks per DT
FREQUENCIES = {"simulation_frequency": SIM_HZ, "policy_frequency": int(round(1 / DT))}
SPAWN_EVERY = SIM_HZ  # ticks (1 s) between the intersection env's clear-and-spawn
CULL_EVERY = 2 * SIM_HZ  # ticks (2 s) between drops of far vehicles


SIM_LOGGER = "highway_env"  # the package's loggers are logging.getLogger(__name__) under it


class SimWarnings:
    """highway-env's log warnings, counted per message with the values in parentheses / brackets elided."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}

    def add(self, message: str) -> None:
        key = re.sub(r"\([^()]*\)|\[[^\[\]]*\]", "(…)", message)
        self.counts[key] += 1
        self.examples.setdefault(key, message)

    def update(self, other: "SimWarnings") -> None:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "by_message": dict(self.counts.most_common()), "examples": dict(self.examples)}

    def summary(self, who: str = "highway-env") -> str | None:
        """One line, or None when there were none."""
        if not self.counts:
            return None
        parts = "; ".join(f"{n} x {k!r}" for k, n in self.counts.most_common(3))
        more = f"; and {len(self.counts) - 3} other message(s)" if len(self.counts) > 3 else ""
        return f"{who}: {self.total} simulator warning(s), not printed per step: {parts}{more}"


class _Counting(logging.Handler):
    def __init__(self, into: SimWarnings):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record):
        try:
            self.into.add(record.getMessage())
        except Exception:  # noqa: BLE001  (a malformed record must not stop the simulation)
            self.into.add(str(record.msg))


@contextmanager
def capture_sim_warnings(into: SimWarnings | None = None):
    """Within the block, highway-env's warnings are counted into `into` (a new SimWarnings by default, yielded)
    instead of printed. Nests: every open block counts each warning."""
    into = SimWarnings() if into is None else into
    logger = logging.getLogger(SIM_LOGGER)
    handler, propagate = _Counting(into), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # neither the root's handlers nor the last-resort one print them
    try:
        yield into
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def make_env(name: str, *, render: bool = False, config: dict | None = None):
    """A highway-env environment by our name (a key of ENV_IDS), offscreen; not reset yet.

    render=True gives an "rgb_array" renderer (headless pygame: SDL_VIDEODRIVER defaults to "offscreen").
    `config` overrides highway-env's defaults (e.g. FREQUENCIES)."""
    if render:
        # headless pygame without SDL's "XDG_RUNTIME_DIR" complaint; "dummy" would switch highway-env's
        # viewer off and leave every render blank, so refuse it.
        if os.environ.setdefault("SDL_VIDEODRIVER", "offscreen") == "dummy":
            raise RuntimeError("SDL_VIDEODRIVER=dummy disables highway-env rendering (blank images); unset it or use 'offscreen'")
    import gymnasium as gym
    import highway_env  # noqa: F401  (registers the environments)

    if name not in ENV_IDS:
        raise ValueError(f"unknown environment {name!r}; expected one of {sorted(ENV_IDS)}")
    kwargs = {"render_mode": "rgb_array"} if render else {}
    return gym.make(ENV_IDS[name], config={"offscreen_rendering": True, **(config or {})}, **kwargs)


def tick(env, env_name: str, step: int) -> None:
    """Advance the world one 1/SIM_HZ step; `step` numbers this tick from the caller's time origin (see module doc)."""
    from datasets_cfg.sim import drivers  # imports highway-env

    u = env.unwrapped
    u.road.act()
    u.road.step(1.0 / SIM_HZ)
    u.time += 1.0 / SIM_HZ
    if env_name == "intersection" and step % SPAWN_EVERY == 0:  # what IntersectionEnv.step does once per second
        u._clear_vehicles()
        u._spawn_vehicle(spawn_probability=u.config["spawn_probability"])
    if step % CULL_EVERY == 0:
        drivers.cull_far_vehicles(env)


# ----------------------------------------------------------------------------------------------
# an ego driven from outside


def hold_ego(env):
    """Stop highway-env from moving the ego (it still checks the ego's collisions); returns the ego vehicle."""
    ego = env.unwrapped.vehicle
    ego.step = lambda dt: None
    ego.act = lambda *a, **k: None
    return ego


def place_ego(env, pose, speed: float) -> None:
    """Put the ego at `pose` = (x, y, heading) of its rear axle in the global frame, driving at `speed`."""
    ego = env.unwrapped.vehicle
    h = pose[2]
    center = np.asarray(pose[:2]) + REAR_AXLE_TO_CENTER * np.array([np.cos(h), np.sin(h)])
    ego.position = np.array([center[0], -center[1]], dtype=float)
    ego.heading = float(-h)
    ego.speed = float(speed)
    ego.on_state_update()


def ego_lane_speed_limit(env) -> float | None:
    """Speed limit (m/s) of the lane the ego is on (None where highway-env has none)."""
    u = env.unwrapped
    return u.road.network.get_lane(u.vehicle.lane_index).speed_limit


def route_ahead(env, length: float) -> list[str]:
    """Lane ids from the ego's lane forward, about `length` m (following the ego's planned route where it has
    one; at a fork without one, highway-env's choice under a fixed seed)."""
    u = env.unwrapped
    ego, net = u.vehicle, u.road.network
    idx = ego.lane_index
    out, total = [idx], net.get_lane(idx).length - net.get_lane(idx).local_coordinates(ego.position)[0]
    rng = np.random.RandomState(0)
    while total < length and len(out) < 50:
        try:
            nxt = net.next_lane(out[-1], route=list(ego.route) if getattr(ego, "route", None) else None, position=ego.position, np_random=rng)
        except (KeyError, IndexError, ValueError):
            break
        if nxt is None or nxt == out[-1] or nxt[:2] == out[-1][:2]:
            break
        out.append(nxt)
        total += net.get_lane(nxt).length
    return [lane_id(i) for i in out]
