"""Who drives in a simulated episode: the ego policy, the other drivers, weather effects, and scripted events.

Everything here acts on highway-env's own behaviour models (IDM longitudinal control, MOBIL lane changes):
we set their parameters per vehicle (instance attributes shadow the class constants highway-env reads
through `self`) and never write vehicle dynamics of our own.

- Ego: an `EgoVehicle` (IDM/MOBIL) replaces highway-env's RL-controlled ego, keeping its route.
- Ego policies: "idm_mobil" (highway-env defaults), "cautious" (long headway, polite), "aggressive"
  (short headway, hard accelerations, eager lane changes).
- Weather "rainy" (simulated, ours): every IDM driver keeps 1.5x the time headway, accelerates at 0.7x and
  brakes at 0.6x its dry comfort limits (lower road friction), and aims 15% slower. Lighting "night"
  (simulated): 1.15x headway and 8% slower targets; the render is darkened too (see sim_render).
- Events (rare manoeuvres, synthetic pool only): a neighbour cutting in, the lead vehicle braking hard, a
  forced ego lane change, a work zone (cones and a barrier closing the ego lane).
"""
from __future__ import annotations

import numpy as np
from highway_env.vehicle.behavior import AggressiveVehicle, DefensiveVehicle, IDMVehicle, LinearVehicle
from highway_env.vehicle.graphics import VehicleGraphics
from highway_env.vehicle.objects import Obstacle

IDM_PARAMS = ("ACC_MAX", "COMFORT_ACC_MAX", "COMFORT_ACC_MIN", "DISTANCE_WANTED", "TIME_WANTED", "DELTA",
              "POLITENESS", "LANE_CHANGE_MIN_ACC_GAIN", "LANE_CHANGE_MAX_BRAKING_IMPOSED", "LANE_CHANGE_DELAY")

EGO_POLICIES = {
    "idm_mobil": {},
    "cautious": {"TIME_WANTED": 2.2, "DISTANCE_WANTED": 12.0, "COMFORT_ACC_MAX": 2.0, "POLITENESS": 0.5,
                 "LANE_CHANGE_MIN_ACC_GAIN": 0.6, "LANE_CHANGE_DELAY": 2.0},
    "aggressive": {"TIME_WANTED": 0.7, "DISTANCE_WANTED": 6.0, "COMFORT_ACC_MAX": 4.5, "COMFORT_ACC_MIN": -7.0,
                   "POLITENESS": 0.0, "LANE_CHANGE_MIN_ACC_GAIN": 0.05, "LANE_CHANGE_MAX_BRAKING_IMPOSED": 4.0,
                   "LANE_CHANGE_DELAY": 0.5},
}
AGGRESSIVE_OTHERS = {"TIME_WANTED": 0.6, "DISTANCE_WANTED": 6.0, "COMFORT_ACC_MAX": 4.5, "COMFORT_ACC_MIN": -7.0,
                     "POLITENESS": 0.0, "LANE_CHANGE_MIN_ACC_GAIN": 0.05, "LANE_CHANGE_MAX_BRAKING_IMPOSED": 5.0,
                     "LANE_CHANGE_DELAY": 0.5}
WEATHER_FACTORS = {  # parameter -> multiplier; "target_speed" scales the desired speed
    "rainy": {"TIME_WANTED": 1.5, "COMFORT_ACC_MAX": 0.7, "COMFORT_ACC_MIN": 0.6, "ACC_MAX": 0.7, "target_speed": 0.85},
    "night": {"TIME_WANTED": 1.15, "target_speed": 0.92},
}


class EgoVehicle(IDMVehicle):
    """The ego: highway-env's IDM/MOBIL driver, always drawn in highway-env's ego colour (green)."""

    # RegulatedRoad recolours yielding vehicles and deletes the colour afterwards: keep ours fixed.
    color = property(lambda self: VehicleGraphics.EGO_COLOR, lambda self, value: None, lambda self: None)


class Cone(Obstacle):
    """A traffic cone (a 1 m channelizer drum: smaller ones vanish at 3 px/m); collides like highway-env's Obstacle."""

    LENGTH = 1.0
    WIDTH = 1.0
    CATEGORY = "traffic_cone"


class Barrier(Obstacle):
    """A work-zone barrier block, placed across a lane (highway-env draws objects correctly only when LENGTH >= WIDTH)."""

    LENGTH = 3.0
    WIDTH = 1.0
    CATEGORY = "barrier"


# ----------------------------------------------------------------------------------------------
# highway-env mutates class constants (IntersectionEnv sets IDMVehicle.DISTANCE_WANTED = 7, ...). Restore
# them before every episode so an episode does not depend on which episodes ran before it in the process.

_BEHAVIOUR_CLASSES = (IDMVehicle, LinearVehicle, AggressiveVehicle, DefensiveVehicle, EgoVehicle)
_SNAPSHOT = {cls: {k: cls.__dict__[k] for k in IDM_PARAMS if k in cls.__dict__} for cls in _BEHAVIOUR_CLASSES}


def restore_class_params() -> None:
    for cls, own in _SNAPSHOT.items():
        for k in IDM_PARAMS:
            if k in own:
                setattr(cls, k, own[k])
            elif k in cls.__dict__:
                delattr(cls, k)


def set_params(vehicle, params: dict, factors: dict | None = None) -> None:
    """Set IDM/MOBIL parameters on one vehicle: absolute `params`, then multiplicative `factors`."""
    for k, val in params.items():
        setattr(vehicle, k, val)
    for k, f in (factors or {}).items():
        if k == "target_speed":
            vehicle.target_speed = float(getattr(vehicle, "target_speed", vehicle.speed)) * f
        else:
            setattr(vehicle, k, getattr(vehicle, k) * f)


def install_ego(env, policy: str) -> EgoVehicle:
    """Replace the env's controlled vehicle by an `EgoVehicle` with the given policy, keeping route and state."""
    if policy not in EGO_POLICIES:
        raise ValueError(f"unknown ego policy {policy!r}; expected one of {sorted(EGO_POLICIES)}")
    u = env.unwrapped
    old = u.vehicle
    ego = EgoVehicle(u.road, old.position.copy(), heading=old.heading, speed=old.speed,
                     target_lane_index=getattr(old, "target_lane_index", None) or old.lane_index,
                     route=getattr(old, "route", None), timer=0.0)
    limit = ego.lane.speed_limit if ego.lane is not None else None
    ego.target_speed = float(limit) if limit else max(float(old.speed), 10.0)
    set_params(ego, EGO_POLICIES[policy])
    u.road.vehicles[u.road.vehicles.index(old)] = ego
    u.controlled_vehicles = [ego]
    return ego


def others(env) -> list:
    u = env.unwrapped
    return [v for v in u.road.vehicles if v is not u.vehicle and isinstance(v, IDMVehicle)]


def apply_conditions(env, weather: str, lighting: str, aggressive_others: bool) -> None:
    """Driver reactions to the (simulated) weather and lighting, and aggressive other drivers."""
    u = env.unwrapped
    for v in [u.vehicle] + others(env):
        if aggressive_others and v is not u.vehicle:
            set_params(v, AGGRESSIVE_OTHERS, {"target_speed": 1.1})
        if weather == "rainy":
            set_params(v, {}, WEATHER_FACTORS["rainy"])
        if lighting == "night":
            set_params(v, {}, WEATHER_FACTORS["night"])


# ----------------------------------------------------------------------------------------------
# traffic density


def thin_traffic(env, keep_fraction: float, rng: np.random.Generator) -> int:
    """Remove other vehicles at random (sparse traffic); returns how many were removed."""
    u = env.unwrapped
    drop = [v for v in u.road.vehicles if v is not u.vehicle and rng.uniform() > keep_fraction]
    for v in drop:
        u.road.vehicles.remove(v)
    return len(drop)


def add_traffic(env, count: int, rng: np.random.Generator, radius: float = 150.0) -> int:
    """Add up to `count` IDM vehicles on random lanes near the ego, clear of everyone (dense traffic)."""
    u = env.unwrapped
    road, ego = u.road, u.vehicle
    lanes = [(f, t, i) for f, tos in road.network.graph.items() for t, ls in tos.items() for i in range(len(ls))]
    added = 0
    for _ in range(count * 20):
        if added >= count:
            break
        index = lanes[int(rng.integers(len(lanes)))]
        lane = road.network.get_lane(index)
        s = float(rng.uniform(0.0, max(lane.length - 5.0, 1.0)))
        pos = lane.position(s, 0.0)
        if np.hypot(*(pos - ego.position)) > radius or np.hypot(*(pos - ego.position)) < 25.0:
            continue
        if any(np.hypot(*(pos - v.position)) < 15.0 for v in road.vehicles):
            continue
        limit = lane.speed_limit or 20.0
        v = IDMVehicle.make_on_lane(road, index, s, speed=float(limit) * float(rng.uniform(0.6, 0.85)))
        v.target_speed = v.speed
        v.randomize_behavior()
        road.vehicles.append(v)
        added += 1
    return added


def cull_far_vehicles(env, radius: float = 300.0) -> None:
    """Drop vehicles too far to ever interact with the ego within an episode (saves O(n^2) IDM work)."""
    u = env.unwrapped
    ego = u.vehicle
    u.road.vehicles = [v for v in u.road.vehicles if v is ego or np.hypot(*(v.position - ego.position)) <= radius]


# ----------------------------------------------------------------------------------------------
# scripted events (rare manoeuvres)


def _ego_lane_s(env, v):
    ego = env.unwrapped.vehicle
    return ego.lane.local_coordinates(v.position)


def lead_vehicle(env, max_gap: float = 60.0):
    """The nearest other vehicle ahead in the ego's lane (or None)."""
    ego = env.unwrapped.vehicle
    front, _ = env.unwrapped.road.neighbour_vehicles(ego, ego.lane_index)
    if front is None or not isinstance(front, IDMVehicle):
        return None
    return front if 0 < ego.lane_distance_to(front) <= max_gap else None


def cut_in(env) -> bool:
    """Make the nearest vehicle slightly ahead in a side lane change into the ego lane, now."""
    u = env.unwrapped
    ego = u.vehicle
    best, best_d = None, None
    for v in others(env):
        if v.lane_index is None or v.lane_index[:2] != ego.lane_index[:2] or v.lane_index == ego.lane_index:
            continue
        if abs(v.lane_index[2] - ego.lane_index[2]) != 1:
            continue
        d = ego.lane_distance_to(v)
        if 2.0 <= d <= 30.0 and (best_d is None or d < best_d):
            best, best_d = v, d
    if best is None:
        return False
    best.target_lane_index = ego.lane_index
    best.enable_lane_change = False  # commit to the manoeuvre (MOBIL would otherwise reconsider it)
    return True


def hard_brake(env) -> object | None:
    """The lead vehicle brakes as hard as it can towards a stop; returns it (to release it later) or None."""
    v = lead_vehicle(env)
    if v is None:
        return None
    v._saved_target_speed = v.target_speed
    v.target_speed = 0.0
    v.ACC_MAX = 8.0
    return v


def release_brake(vehicle) -> None:
    if vehicle is not None and hasattr(vehicle, "_saved_target_speed"):
        vehicle.target_speed = vehicle._saved_target_speed


def ego_lane_change(env, rng: np.random.Generator) -> bool:
    """Force the ego to start a lane change to a reachable side lane, whatever MOBIL thinks."""
    u = env.unwrapped
    ego = u.vehicle
    sides = [i for i in u.road.network.side_lanes(ego.lane_index) if u.road.network.get_lane(i).is_reachable_from(ego.position)]
    if not sides:
        return False
    ego.target_lane_index = sides[int(rng.integers(len(sides)))]
    ego.LANE_CHANGE_DELAY = 4.0  # do not change straight back
    ego.timer = 0.0
    return True


def work_zone(env, rng: np.random.Generator) -> bool:
    """Close the ego lane ahead with a taper of cones and a barrier (static objects that collide)."""
    u = env.unwrapped
    ego = u.vehicle
    lane = ego.lane
    s0, _ = lane.local_coordinates(ego.position)
    start = s0 + float(rng.uniform(110.0, 160.0))  # far enough for IDM to stop or change lanes
    if lane.length < start + 20.0:
        return False
    w = lane.width_at(start)
    side = 1.0 if rng.uniform() < 0.5 else -1.0  # taper from the right or the left border
    for k in range(6):
        lat = side * (w / 2.0 - 0.3 - k * (w - 0.6) / 5.0)
        u.road.objects.append(Cone(u.road, lane.position(start + 3.0 * k, lat), lane.heading_at(start)))
    u.road.objects.append(Barrier(u.road, lane.position(start + 20.0, 0.0), lane.heading_at(start + 20.0) + np.pi / 2))
    return True
