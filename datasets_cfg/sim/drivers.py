"""Who drives in a simulated episode: the ego policy, the other drivers, weather effects, and scripted events.

Everything here acts on highway-env's own behaviour models (IDM longitudinal control, MOBIL lane changes,
the kinematic bicycle): we set their parameters per vehicle (instance attributes shadow the class constants
highway-env reads through `self`) and never integrate vehicle dynamics of our own.

- Ego: an `EgoVehicle` replaces highway-env's RL-controlled ego, keeping its route. It decides like
  highway-env's IDM/MOBIL driver but drives like a comfortable human (see `EgoVehicle`): a speed profile that
  slows down before curves, acceleration and steering commands limited in size and rate, and a smoother
  lane-keeping controller; highway-env's defaults (+3 / -5 m/s^2 IDM, steering time constant 0.2 s, 6 m/s
  lateral speed in a lane change) exceed what NAVSIM's comfort bounds accept from a human driver.
- Ego policies: "idm_mobil" (highway-env's IDM/MOBIL parameters, comfortable commands), "cautious" (long
  headway, polite, gentler), and the synthetic "aggressive" (short headway, eager and quicker lane changes,
  faster curves, and harsh longitudinal limits: +3.5 / -6 m/s^2 at 8 m/s^3; meant to differ from the real pool).
- Other drivers keep highway-env's defaults (their comfort is not scored).
- Weather "rainy" (simulated, ours): every IDM driver keeps 1.5x the time headway, accelerates at 0.7x and
  brakes at 0.6x its dry comfort limits (lower road friction), and aims 15% slower. Lighting "night"
  (simulated): 1.15x headway and 8% slower targets; the render is darkened too (see render.py).
- Events (rare manoeuvres, synthetic pool only): a neighbour cutting in, the lead vehicle braking hard, a
  forced ego lane change, a work zone (cones and a barrier closing the ego lane).
"""
from __future__ import annotations

import numpy as np
from highway_env import utils
from highway_env.road.lane import SineLane, StraightLane
from highway_env.vehicle.behavior import AggressiveVehicle, DefensiveVehicle, IDMVehicle, LinearVehicle
from highway_env.vehicle.graphics import VehicleGraphics
from highway_env.vehicle.kinematics import Vehicle
from highway_env.vehicle.objects import Obstacle

from datasets_cfg.sim.export import ROUTE_JOIN_M, connector_between, junction_kind

IDM_PARAMS = ("ACC_MAX", "COMFORT_ACC_MAX", "COMFORT_ACC_MIN", "DISTANCE_WANTED", "TIME_WANTED", "DELTA",
              "POLITENESS", "LANE_CHANGE_MIN_ACC_GAIN", "LANE_CHANGE_MAX_BRAKING_IMPOSED", "LANE_CHANGE_DELAY")

EGO_POLICIES = {
    "idm_mobil": {},
    "cautious": {"TIME_WANTED": 2.0, "COMFORT_ACC_MAX": 1.2, "POLITENESS": 0.5,
                 "LANE_CHANGE_MIN_ACC_GAIN": 0.6, "LANE_CHANGE_DELAY": 2.0, "A_LAT_MAX": 2.0},
    "aggressive": {"TIME_WANTED": 0.7, "DISTANCE_WANTED": 6.0, "COMFORT_ACC_MAX": 4.5, "COMFORT_ACC_MIN": -7.0,
                   "POLITENESS": 0.0, "LANE_CHANGE_MIN_ACC_GAIN": 0.05, "LANE_CHANGE_MAX_BRAKING_IMPOSED": 4.0,
                   "LANE_CHANGE_DELAY": 0.5,
                   # harsh longitudinal commands: beyond NAVSIM's comfort bounds on purpose (synthetic pool only)
                   "ACC_UP": 3.5, "BRAKE_MAX": -6.0, "JERK_MAX": 8.0, "A_LAT_MAX": 3.2, "CURVE_DECEL": 3.0,
                   "LAT_SPEED_MAX": 1.6},
}
AGGRESSIVE_OTHERS = {"TIME_WANTED": 0.6, "DISTANCE_WANTED": 6.0, "COMFORT_ACC_MAX": 4.5, "COMFORT_ACC_MIN": -7.0,
                     "POLITENESS": 0.0, "LANE_CHANGE_MIN_ACC_GAIN": 0.05, "LANE_CHANGE_MAX_BRAKING_IMPOSED": 5.0,
                     "LANE_CHANGE_DELAY": 0.5}
WEATHER_FACTORS = {  # parameter -> multiplier; "target_speed" scales the desired speed
    "rainy": {"TIME_WANTED": 1.5, "COMFORT_ACC_MAX": 0.7, "COMFORT_ACC_MIN": 0.6, "ACC_MAX": 0.7, "target_speed": 0.85},
    "night": {"TIME_WANTED": 1.15, "target_speed": 0.92},
}


def path_ahead(vehicle, length: float, start=None) -> list:
    """[(lane index, lane, s_from, s_to)] covering `length` m ahead of `vehicle` along its target lane (or the
    lane `start`), then the lanes highway-env will make it follow (`RoadNetwork.next_lane` on a copy of its
    route), across junction gaps by their connector (lane index None, see `export.ConnectorLane`). Where
    the road network ends (no next lane starting near the last one's end), the last lane is extrapolated."""
    net = vehicle.road.network
    idx = vehicle.target_lane_index if start is None else start
    lane = net.get_lane(idx)
    s = float(lane.local_coordinates(vehicle.position)[0])
    route = [tuple(r) for r in vehicle.route] if getattr(vehicle, "route", None) else None
    pieces, left = [], float(length)
    bridge = getattr(vehicle, "bridge", None) if start is None else None
    if bridge is not None:  # crossing a junction gap into the target lane: the connector first
        s_c = min(max(bridge.local_coordinates(vehicle.position)[0], 0.0), bridge.length)
        take = min(left, bridge.length - s_c)
        pieces.append((None, bridge, s_c, s_c + take))
        left -= take
        s = 0.0
        if left <= 1e-6:
            return pieces
    for _ in range(8):
        take = min(left, lane.length - s)
        if take > 0:
            pieces.append((idx, lane, s, s + take))
            left -= take
        if left <= 1e-6:
            break
        try:
            nxt = net.next_lane(idx, route=route, position=lane.position(lane.length, 0.0))
        except (KeyError, IndexError, ValueError):
            nxt = idx
        nxt_lane = net.get_lane(nxt) if nxt != idx else None
        end = lane.position(lane.length, 0.0)
        joined = nxt_lane is not None and nxt[:2] != idx[:2] and np.hypot(*(nxt_lane.position(0.0, 0.0) - end)) <= ROUTE_JOIN_M
        conn = None if joined or nxt_lane is None or nxt[:2] == idx[:2] else connector_between(net, idx, nxt)
        if not joined and conn is None:
            # the road ends (highway-env may also name the far ends of an exit and an approach lane alike: a jump)
            s_end = max(s, lane.length)
            pieces.append((idx, lane, s_end, s_end + left))
            break
        if conn is not None:  # a junction gap (roundabout entries and exits): curve across it
            take = min(left, conn.length)
            pieces.append((None, conn, 0.0, take))
            left -= take
            if left <= 1e-6:
                break
        idx, lane, s = nxt, nxt_lane, 0.0
    return pieces


class EgoVehicle(IDMVehicle):
    """The ego: highway-env's IDM/MOBIL decisions, driven like a comfortable human, in highway-env's ego green.

    On top of IDMVehicle (decisions unchanged: IDM acceleration, MOBIL lane changes, route following):
    - Curve speed: IDM's desired speed is capped by a speed profile along the path ahead (target lane, then
      the lanes highway-env will follow): at most sqrt(A_LAT_MAX / curvature) and YAW_RATE_MAX / curvature
      in a curve, and JUNCTION_SPEED on an intersection's lane connectors (crossing traffic may appear),
      reached by braking at CURVE_DECEL (looking v^2 / (2 CURVE_DECEL) + 30 m ahead). At a roundabout entry
      it yields to ring traffic (`entry_speed`).
    - Longitudinal command: IDM's acceleration (comfortable IDM: a = COMFORT_ACC_MAX, b = -COMFORT_ACC_MIN)
      clipped to [BRAKE_MAX, ACC_UP] and rate-limited to JERK_MAX; when IDM asks for more braking than
      BRAKE_MAX (an emergency), down to BRAKE_EMERGENCY at JERK_EMERGENCY. It never brakes into reverse.
    - Lateral command: highway-env's cascade (lateral offset -> lateral speed -> heading -> yaw rate) with a
      lateral speed capped at LAT_SPEED_MAX and a heading off the lane capped at HEADING_OFFSET_MAX (a lane
      change takes ~4 s instead of ~1 s, and at walking pace it is a gentle drift), slower time
      constants, the path heading looked up TAU_HEADING ahead (a steady curve needs no lateral error), and
      the yaw-rate command clipped to YAW_RATE_MAX and rate-limited to YAW_ACCEL_MAX; the steering angle is
      the one highway-env's bicycle model needs for that yaw rate.
    Commands are recomputed every simulation step (CONTROL_DT, the episode's 1 / SIM_HZ).
    """

    # RegulatedRoad recolours yielding vehicles and deletes the colour afterwards: keep ours fixed.
    color = property(lambda self: VehicleGraphics.EGO_COLOR, lambda self, value: None, lambda self: None)

    # comfortable IDM (highway-env: a = 3, b = 5 m/s^2)
    COMFORT_ACC_MAX = 1.5
    COMFORT_ACC_MIN = -3.0
    # command limits
    ACC_UP = 2.0  # m/s^2
    BRAKE_MAX = -3.5  # m/s^2, hardest comfortable braking
    BRAKE_EMERGENCY = -6.0  # m/s^2 (highway-env's ACC_MAX), only when IDM asks for more than BRAKE_MAX
    JERK_MAX = 2.0  # m/s^3
    JERK_EMERGENCY = 15.0  # m/s^3
    # lateral control (highway-env: TAU_HEADING 0.2 s, TAU_LATERAL 0.6 s, lateral speed up to ~v)
    TAU_HEADING = 0.45  # s
    TAU_LATERAL = 1.0  # s
    LAT_SPEED_MAX = 1.2  # m/s
    HEADING_OFFSET_MAX = 0.25  # rad, heading relative to the lane while closing a lateral offset (highway-env: pi / 4)
    YAW_RATE_MAX = 0.8  # rad/s
    YAW_ACCEL_MAX = 0.6  # rad/s^2
    # curve speed
    A_LAT_MAX = 2.5  # m/s^2
    CURVE_DECEL = 1.5  # m/s^2
    JUNCTION_SPEED = 6.0  # m/s, approach speed of an intersection (its lane connectors)
    SPEED_TAU = 1.0  # s, time to shed excess speed above the speed profile
    GAP_ACCEPT_S = 3.0  # s, entering a ring waits while a ring vehicle is due at the merge point within this
    ENTRY_LOOK_M = 40.0  # m, how far ahead a ring entry is considered
    CONTROL_DT = 0.1  # s

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._accel_cmd = 0.0
        self._yaw_rate_cmd = 0.0
        self.bridge = None  # the ConnectorLane being followed across a junction gap into the target lane
        self.junction_edges: set = set()  # road segments inside intersections (set by `install_ego`)
        self.ring_edges: set = set()  # road segments of a roundabout ring (set by `install_ego`)
        self.emergency = False  # this step's braking exceeds BRAKE_MAX (IDM asked for it)
        self._path = None  # (target lane, length, pieces): the path ahead, computed once per step

    # ---- the path ahead -------------------------------------------------------------------
    def _pieces_ahead(self, length: float) -> list:
        """[(lane index, lane, s_from, s_to)] covering `length` m of the path ahead (`path_ahead`), cached for this step."""
        if self._path is not None and self._path[0] == self.target_lane_index and self._path[1] >= length:
            return self._path[2]
        pieces = path_ahead(self, length)
        self._path = (self.target_lane_index, length, pieces)
        return pieces

    @staticmethod
    def _heading_at(pieces: list, d):
        """Heading of the path `d` m ahead (scalar or array; the last piece is extended if the path is shorter)."""
        d = np.asarray(d, dtype=float)
        out = np.zeros_like(d)
        start = 0.0
        for k, (_, lane, s0, s1) in enumerate(pieces):
            last = k == len(pieces) - 1
            m = (d >= start) & ((d <= start + s1 - s0) | last) if k else (d <= s1 - s0) | last
            if m.any():
                s = s0 + d[m] - start
                try:
                    out[m] = np.broadcast_to(lane.heading_at(s), s.shape)
                except (TypeError, ValueError):  # a lane type whose heading_at takes scalars only
                    out[m] = [lane.heading_at(x) for x in s]
            start += s1 - s0
        return float(out) if out.ndim == 0 else out

    def curve_speed(self, pieces: list | None = None, step: float = 2.0) -> float:
        """The highest speed (m/s) from which every curve ahead is reached at its comfortable speed."""
        horizon = min(self.speed**2 / (2.0 * self.CURVE_DECEL) + 30.0, 200.0)
        pieces = pieces if pieces is not None else self._pieces_ahead(max(horizon, self.ENTRY_LOOK_M) + step)
        limit, d0 = float("inf"), 0.0
        for idx, lane, s0, s1 in pieces:  # slow down to JUNCTION_SPEED before entering a junction
            if idx is not None and idx[:2] in self.junction_edges:
                limit = np.sqrt(self.JUNCTION_SPEED**2 + 2.0 * self.CURVE_DECEL * d0)
                break
            d0 += s1 - s0
        if all(isinstance(lane, StraightLane) and not isinstance(lane, SineLane) for _, lane, _, _ in pieces):
            return limit
        d = np.arange(0.0, horizon, step)
        h = np.unwrap(self._heading_at(pieces, np.append(d, horizon)))
        kappa = np.abs(np.diff(h)) / step  # mean curvature of each step
        kappa = np.maximum(kappa, 1e-6)
        v_curve = np.minimum(np.sqrt(self.A_LAT_MAX / kappa), self.YAW_RATE_MAX / kappa)
        return float(min(limit, np.min(np.sqrt(v_curve**2 + 2.0 * self.CURVE_DECEL * d))))

    def entry_speed(self, pieces: list | None = None) -> float:
        """Gap acceptance where the path crosses a junction gap into a ring (a roundabout entry): while a vehicle on
        the ring would reach the merge point within GAP_ACCEPT_S, the highest speed from which the ego still stops
        comfortably (CURVE_DECEL) before the gap; otherwise no limit. highway-env's drivers do not yield there."""
        pieces = pieces if pieces is not None else self._pieces_ahead(self.ENTRY_LOOK_M)
        d = 0.0
        for k, (idx, lane, s0, s1) in enumerate(pieces):
            nxt = pieces[k + 1][0] if k + 1 < len(pieces) else None
            if idx is None and nxt is not None and nxt[:2] in self.ring_edges and lane is not self.bridge:
                if self._ring_traffic(nxt, lane.position(lane.length, 0.0)):
                    return float(np.sqrt(2.0 * self.CURVE_DECEL * max(d - 1.0, 0.0)))
                return float("inf")
            d += s1 - s0
            if d > self.ENTRY_LOOK_M:
                break
        return float("inf")

    def _ring_traffic(self, target, merge: np.ndarray) -> bool:
        """Is a vehicle on the ring, on the target lane's segment or one leading into it, due at `merge` soon?"""
        net = self.road.network
        upstream = {(f, target[0]) for f, tos in net.graph.items() if target[0] in tos} | {target[:2]}
        for v in self.road.vehicles:
            if v is self or v.lane_index is None or v.lane_index[:2] not in upstream or v.lane_index[:2] not in self.ring_edges:
                continue
            gap = merge - v.position
            dist = float(np.hypot(*gap))
            if dist < 40.0 and float(np.dot(v.velocity, gap)) > 0 and dist / max(float(v.speed), 0.1) < self.GAP_ACCEPT_S:
                return True
        return False

    # ---- control ------------------------------------------------------------------------------
    def idm(self, front, lane, desired_speed: float) -> float:
        """IDM acceleration towards `desired_speed` behind `front` (or free road), the gap measured along `lane`.

        As highway-env's IDMVehicle.acceleration, except: above the desired speed the free-road term brakes
        at least (v - desired) / SPEED_TAU (IDM alone brakes only ~0.5 a at 10 % too fast, too late for a
        curve) and at most BRAKE_MAX (a desired speed far below the current one, e.g. highway-env's "yield"
        that sets it to 0, asks for a firm stop, not an emergency one); and the gap to a vehicle found on the
        target lane is measured along the target lane (highway-env measures it along the current lane, which
        at a junction makes a car driving away on a crossing road look like a stopped car ahead).
        """
        v = max(float(self.speed), 0.0)
        free = self.COMFORT_ACC_MAX * (1.0 - np.power(v / max(abs(desired_speed), 1e-2), self.DELTA))
        if v > desired_speed:  # too fast (a curve or junction ahead): close the gap within SPEED_TAU at least
            free = min(free, -(v - desired_speed) / self.SPEED_TAU)
        acc = max(free, self.BRAKE_MAX)
        if front is not None:
            d = lane.local_coordinates(front.position)[0] - lane.local_coordinates(self.position)[0]
            acc -= self.COMFORT_ACC_MAX * np.power(self.desired_gap(self, front) / utils.not_zero(max(d, 1e-2)), 2)
        return float(acc)

    def follow_road(self) -> None:
        """highway-env's lane switch at a lane's end; across a junction gap, steer along its connector until the
        next lane starts (highway-env would steer straight at the next lane, off every lane polygon)."""
        before = self.target_lane_index
        super().follow_road()
        if self.target_lane_index != before:
            self.bridge = connector_between(self.road.network, before, self.target_lane_index)
        elif self.bridge is not None:
            s, _ = self.bridge.local_coordinates(self.position)
            if s >= self.bridge.length:
                self.bridge = None

    def act(self, action=None) -> None:
        """IDMVehicle.act (route following, MOBIL, IDM on the current and the target lane) with comfortable commands."""
        if self.crashed:
            return
        self._path = None  # the ego moved: a new path ahead
        self.follow_road()
        if self.enable_lane_change:
            self.change_lane_policy()
        steering = self.steering_control(self.target_lane_index)
        desired = self.target_speed
        if self.lane is not None and self.lane.speed_limit is not None:
            desired = float(np.clip(desired, 0.0, self.lane.speed_limit))
        desired = min(desired, self.curve_speed(), self.entry_speed())
        front, _ = self.road.neighbour_vehicles(self, self.lane_index)
        raw = self.idm(front, self.lane, desired)
        if self.lane_index != self.target_lane_index:  # changing lanes (or about to enter the next one)
            target = self.road.network.get_lane(self.target_lane_index)
            front_t, _ = self.road.neighbour_vehicles(self, self.target_lane_index)
            raw = min(raw, self.idm(front_t, target, desired))
        dt = self.CONTROL_DT
        prev = self._accel_cmd
        self.emergency = raw < self.BRAKE_MAX
        if self.emergency:
            want, jerk = max(raw, self.BRAKE_EMERGENCY), self.JERK_EMERGENCY
        else:
            want, jerk = min(raw, self.ACC_UP), self.JERK_MAX
        accel = prev + float(np.clip(want - prev, -jerk * dt, jerk * dt))
        self._accel_cmd = max(accel, -max(float(self.speed), 0.0) / dt)  # stop, do not reverse
        Vehicle.act(self, {"steering": steering, "acceleration": self._accel_cmd})

    def steering_control(self, target_lane_index) -> float:
        lane = self.road.network.get_lane(target_lane_index)
        if self.bridge is not None and target_lane_index == self.target_lane_index:
            lane = self.bridge
        _, lateral = lane.local_coordinates(self.position)
        v = max(float(self.speed), 1.0)
        look = v * self.TAU_HEADING
        heading_path = self._heading_at(self._pieces_ahead(look + 1.0), look)
        lat_speed = float(np.clip(-lateral / self.TAU_LATERAL, -self.LAT_SPEED_MAX, self.LAT_SPEED_MAX))
        offset = float(np.arcsin(np.clip(lat_speed / v, -1.0, 1.0)))
        heading_ref = heading_path + float(np.clip(offset, -self.HEADING_OFFSET_MAX, self.HEADING_OFFSET_MAX))
        yaw_rate = utils.wrap_to_pi(heading_ref - self.heading) / self.TAU_HEADING
        yaw_rate = float(np.clip(yaw_rate, -self.YAW_RATE_MAX, self.YAW_RATE_MAX))
        step = self.YAW_ACCEL_MAX * self.CONTROL_DT
        self._yaw_rate_cmd += float(np.clip(yaw_rate - self._yaw_rate_cmd, -step, step))
        # highway-env's bicycle: yaw rate = v sin(beta) / (L / 2), beta = atan(tan(steering) / 2)
        beta = np.arcsin(np.clip(self._yaw_rate_cmd * self.LENGTH / 2.0 / v, -1.0, 1.0))
        return float(np.clip(np.arctan(2.0 * np.tan(beta)), -self.MAX_STEERING_ANGLE, self.MAX_STEERING_ANGLE))


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


def install_ego(env, policy: str, env_name: str = "") -> EgoVehicle:
    """Replace the env's controlled vehicle by an `EgoVehicle` with the given policy, keeping route and state.
    `env_name` (a world.ENV_IDS key) tells which road segments are intersection lane connectors."""
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
    edges = [(f, t) for f, tos in u.road.network.graph.items() for t in tos]
    ego.junction_edges = {e for e in edges if junction_kind(env_name, e) == ("lane_connector", True)}
    ego.ring_edges = {e for e in edges if junction_kind(env_name, e) == ("lane", True)}
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


def _gap_free(env, lane_index, margin: float = 6.0) -> bool:
    """No vehicle on that lane within `margin` m (bumper to bumper) of the ego, ahead or behind."""
    u = env.unwrapped
    ego = u.vehicle
    lane = u.road.network.get_lane(lane_index)
    s0 = lane.local_coordinates(ego.position)[0]
    for v in u.road.vehicles:
        if v is ego:
            continue
        s, lat = lane.local_coordinates(v.position)
        if abs(lat) < lane.width_at(s) / 2 + 1.0 and abs(s - s0) < margin + (ego.LENGTH + v.LENGTH) / 2:
            return False
    return True


def ego_lane_change(env, rng: np.random.Generator) -> bool:
    """Force the ego to start a lane change to a reachable side lane whatever MOBIL thinks (no gain needed), into
    a free gap (a human still looks: no vehicle within 6 m of its bumpers there)."""
    u = env.unwrapped
    ego = u.vehicle
    sides = [i for i in u.road.network.side_lanes(ego.lane_index)
             if u.road.network.get_lane(i).is_reachable_from(ego.position) and _gap_free(env, i)]
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
    side = 1.0 if rng.uniform() < 0.5 else -1.0  # taper from the right or the left side
    # cone centres stay > 1 m inside the lane borders: highway-env's drivers count anything within 1 m of a
    # lane's border as in that lane, and would think the open neighbour lane closed too (no car fits beside)
    reach = w / 2.0 - 1.05
    for k in range(6):
        lat = side * (reach - k * 2.0 * reach / 5.0)
        u.road.objects.append(Cone(u.road, lane.position(start + 3.0 * k, lat), lane.heading_at(start)))
    u.road.objects.append(Barrier(u.road, lane.position(start + 20.0, 0.0), lane.heading_at(start + 20.0) + np.pi / 2))
    return True
