"""Everything about one scene that does not depend on the trajectory being scored (NAVSIM's "metric cache"
minus the PDM-Closed reference): the ego start state, the logged history, the map as polygon sets, the
route centreline and the log-replay observation.

`SceneContext.build` raises `SceneError` with a reason a person can act on when a scene cannot be scored
(no map geometry, no route, ...); the scorer turns that into an explicit invalid row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from common.errors import MoseError
from common.geometry import wrap_angle
from eval.navsim import observation as obs_mod
from eval.navsim.config import AX, AY, DEFAULT, HEADING, STATE_SIZE, VX, Protocol, VehicleParams, X, Y
from eval.navsim.geometry import PolygonSet, Polyline, ego_boxes
from eval.navsim.simulate import initial_state

DRIVABLE_AREA_KINDS = ("roadblock", "intersection", "carpark")  # map.areas kinds that make up the drivable area


class SceneError(MoseError, ValueError):
    """A scene cannot be scored; the message says why (it becomes the `reason` of an invalid row)."""


class MapIndex:
    """Lane, drivable-area and intersection polygons in one PolygonSet, so every ego point of every state is
    tested against every polygon in one vectorised call."""

    def __init__(self, lanes: list, lane_ids: tuple, lane_on_route: np.ndarray, drivable: list, intersections: list):
        self.lane_ids = lane_ids
        self.lane_on_route = lane_on_route
        self.all = PolygonSet(list(lanes) + list(drivable) + list(intersections))
        a, b = len(lanes), len(lanes) + len(drivable)
        self.lane_sl, self.drivable_sl, self.inter_sl = slice(0, a), slice(a, b), slice(b, len(self.all))
        self.lanes = _SubSet(self.all, self.lane_sl)

    def area_flags(self, corners: np.ndarray, centers: np.ndarray, rear: np.ndarray) -> dict:
        """Ego-area flags per state from corners (..., 4, 2), box centres (..., 2) and rear axles (..., 2)."""
        pts = np.concatenate([corners, centers[..., None, :], rear[..., None, :]], axis=-2)  # (..., 6, 2)
        inside = self.all.contains(pts)  # (..., 6, K)
        in_lane = inside[..., :4, self.lane_sl]
        in_drivable = inside[..., :4, self.drivable_sl].any(-1)
        center_on_route = (inside[..., 4, self.lane_sl] & self.lane_on_route).any(-1)
        return {
            "multiple_lanes": (in_lane.any(-2).sum(-1) > 1) & ~in_lane.all(-2).any(-1),
            "non_drivable": ~in_drivable.all(-1),
            "oncoming": ~center_on_route,
            "center_in_intersection": inside[..., 4, self.inter_sl].any(-1),
            "rear_in_intersection": inside[..., 5, self.inter_sl].any(-1),
        }


class _SubSet:
    """A slice of a PolygonSet queried on its own."""

    def __init__(self, full: PolygonSet, sl: slice):
        self.full, self.sl = full, sl

    def contains(self, points: np.ndarray) -> np.ndarray:
        return self.full.contains(points)[..., self.sl]


@dataclass
class SceneContext:
    id: str
    source: str
    log_name: str
    timestamp_s: float | None
    origin: np.ndarray  # (3,) current ego pose, global
    initial: np.ndarray  # (11,) state at t = 0
    history: np.ndarray  # (H, 11) logged past states every 0.1 s before now (for history comfort)
    map: MapIndex
    centerline: Polyline
    on_route: set
    lanes: dict  # lane id -> polygon ring
    speed_limit: float  # of the lane the ego starts in (NaN if unknown)
    observation: obs_mod.Observation
    vehicle: VehicleParams  # ego footprint: the protocol's (Pacifica), or the scene's own from meta "ego_size"
    scene: object = field(repr=False, default=None)
    _replay_v1: tuple | None = field(repr=False, default=None)
    _protocol: Protocol = field(repr=False, default=DEFAULT)
    _observation_v1: obs_mod.Observation | None = field(repr=False, default=None)

    @classmethod
    def build(cls, scene, protocol: Protocol = DEFAULT) -> "SceneContext":
        sp = protocol.scorer
        row = scene.row
        veh = scene_vehicle(scene, protocol.vehicle)
        ego = row["ego"]
        if len(ego["t"]) == 0:
            raise SceneError("scene has no ego states")
        lanes_all = row["map"]["lanes"]
        lanes = {l["id"]: np.asarray(l["polygon"], float) for l in lanes_all if len(l["polygon"]) >= 3}
        areas = [np.asarray(a["polygon"], float) for a in row["map"]["areas"] if len(a["polygon"]) >= 3]
        if not areas:
            raise SceneError("scene has no map geometry: no drivable-area polygons (map.areas) to test the ego against")
        if not lanes:
            raise SceneError("scene has no map geometry: no lane polygons (map.lanes[].polygon)")
        route = list(row["map"]["route"])
        on_route = set(route) | {l["id"] for l in lanes_all if l["on_route"]}
        if not route:
            raise SceneError("scene has no route (map.route is empty): progress and lane keeping need a route centreline")
        centerline = route_centerline(lanes_all, route, scene.ego_pose())
        lane_ids = tuple(lanes)
        kinds = [a["kind"] for a in row["map"]["areas"] if len(a["polygon"]) >= 3]
        # The drivable area is the roadblock, intersection and carpark polygons only: roadblock connectors are
        # not in it (navsim .../pdm_planner/observation/pdm_occupancy_map.py:134-186 adds roadblock connectors only
        # through their lane connectors; .../scoring/pdm_scorer.py:321-328 tests the corners against ROADBLOCK,
        # INTERSECTION, DRIVABLE_AREA and CARPARK_AREA polygons), so a corner that only a connector covers is off it.
        drivable = [r for r, k in zip(areas, kinds) if k in DRIVABLE_AREA_KINDS]
        if not drivable:
            raise SceneError(f"scene has no drivable-area polygons of kind {'/'.join(DRIVABLE_AREA_KINDS)} (map.areas; roadblock connectors do not count)")
        map_index = MapIndex(
            lanes=[lanes[i] for i in lane_ids],
            lane_ids=lane_ids,
            lane_on_route=np.array([i in on_route for i in lane_ids], dtype=bool),
            drivable=drivable,
            intersections=[r for r, k in zip(areas, kinds) if k == "intersection"],
        )

        ci = scene.current_index
        pose = scene.ego_pose()
        vy = scene.meta.get("ego_vy")  # NAVSIM's logged lateral speed (ego frame), if the source kept it
        speed_lat = float(vy[ci]) if isinstance(vy, (list, tuple)) and len(vy) == len(ego["t"]) else 0.0
        init = initial_state(pose, float(ego["speed"][ci]), float(ego["accel"][ci]), float(ego["accel_lat"][ci]), protocol=protocol, speed_lat=speed_lat)
        corners0, center0 = ego_boxes(init, veh)
        num_steps = int(round((sp.horizon_s + sp.ttc_horizon) / sp.dt)) + 1  # TTC looks 0.9 s past the last step (v1)
        observation = obs_mod.log_replay(scene, corners0, on_route, lanes, num_steps, sp.dt, sp.track_stopped_speed,
                                         frame_interval=sp.agent_frame_interval, frame_horizon=sp.horizon_s)
        replay_v1 = None
        if sp.agent_frame_interval is not None and sp.agent_frame_horizon_v1 != sp.horizon_s:
            replay_v1 = (corners0, num_steps)

        # speed limit of the route lane under the ego (else the nearest route lane)
        speed_limit = np.nan
        lane_speed = {l["id"]: l["speed_limit"] for l in lanes_all}
        route_lanes = [i for i in lane_ids if i in on_route]
        if route_lanes:
            inside = map_index.lanes.contains(pose[None, :2])[0] & map_index.lane_on_route
            if inside.any():
                speed_limit = lane_speed[lane_ids[int(np.flatnonzero(inside)[0])]]
            else:
                dists = [Polyline(np.asarray(l["centerline"], float)).project(pose[None, :2])[1][0] for l in lanes_all if l["id"] in on_route and len(l["centerline"]) >= 2]
                cand = [l for l in lanes_all if l["id"] in on_route and len(l["centerline"]) >= 2]
                if cand:
                    speed_limit = cand[int(np.argmin(dists))]["speed_limit"]

        meta = scene.meta
        ts = meta.get("timestamp_s")
        return cls(
            id=scene.id, source=row["source"], log_name=str(meta.get("log_name", "")), timestamp_s=None if ts is None else float(ts),
            origin=pose, initial=init, history=_history_states(scene, sp.history_s, sp.dt), map=map_index, centerline=centerline,
            on_route=on_route, lanes=lanes, speed_limit=float(speed_limit) if speed_limit is not None else np.nan,
            observation=observation, vehicle=veh, scene=scene, _replay_v1=replay_v1, _protocol=protocol,
        )

    def observation_for(self, version: str) -> obs_mod.Observation:
        """The log-replay observation of a metric version: v2 (and v1 when the frame horizons agree) is
        `observation`; v1 reads the 2 Hz frames up to 5 s, as the v1.1 metric cache (built once, on first use)."""
        if version == "v2" or self._replay_v1 is None:
            return self.observation
        if self._observation_v1 is None:
            sp = self._protocol.scorer
            corners0, num_steps = self._replay_v1
            self._observation_v1 = obs_mod.log_replay(self.scene, corners0, self.on_route, self.lanes, num_steps, sp.dt, sp.track_stopped_speed,
                                                      frame_interval=sp.agent_frame_interval, frame_horizon=sp.agent_frame_horizon_v1)
        return self._observation_v1


def scene_vehicle(scene, default: VehicleParams) -> VehicleParams:
    """The ego footprint to score a scene with. NAVSIM scenes carry none and get the protocol's Pacifica; a
    source that records the footprint of the vehicle it actually drove in meta "ego_size" = {"length", "width",
    "rear_axle_to_center"} (our simulator does) is scored with that box, so collisions and off-road checks
    agree with the simulator's own. The wheelbase (controller, comfort) stays the protocol's."""
    size = scene.meta.get("ego_size")
    if not isinstance(size, dict):
        return default
    try:
        L, W = float(size["length"]), float(size["width"])
        r = float(size.get("rear_axle_to_center", default.rear_axle_to_center))
    except (KeyError, TypeError, ValueError):
        raise SceneError(f"meta 'ego_size': expected {{'length', 'width', 'rear_axle_to_center'}} in metres, got {size!r}") from None
    if not (0 < W < L and abs(r) < L / 2):
        raise SceneError(f"meta 'ego_size': implausible ego box {size!r}")
    return VehicleParams(length=L, width=W, front_length=L / 2 + r, rear_length=L / 2 - r, wheel_base=default.wheel_base, rear_axle_to_center=r)


def route_centerline(lanes_all: list, route: list, pose: np.ndarray, join_tol: float = 1.0) -> Polyline:
    """The route centreline as NAVSIM's PDM-Closed builds it: start at the route lane the ego is on (nearest
    centreline to the rear axle), then follow route lanes that connect (start within `join_tol` m of the
    current end), in route order. Route lanes that do not connect (e.g. the parallel lane of a lane change
    that some sources list in the route) are skipped, so the line never jumps sideways or backwards."""
    cl = {l["id"]: np.asarray(l["centerline"], float) for l in lanes_all if len(l["centerline"]) >= 2}
    route = [r for r in route if r in cl]
    if not route:
        raise SceneError("scene's route lanes have no centrelines (map.lanes[].centerline)")
    dists = [Polyline(cl[r]).project(np.asarray(pose[:2])[None])[1][0] for r in route]
    start = int(np.argmin(dists))
    chain = [cl[route[start]]]
    for r in route[start + 1:]:
        c = cl[r]
        if np.linalg.norm(c[0] - chain[-1][-1]) <= join_tol:
            chain.append(c[1:] if np.allclose(c[0], chain[-1][-1]) else c)
    return Polyline(np.concatenate(chain))


def _history_states(scene, history_s: float, dt: float) -> np.ndarray:
    """Logged ego states at -history_s, ..., -2*dt (the devkit drops the last sample before now), every dt.

    Times before the first logged frame are skipped. Accelerations are the logged ones (rear axle). Angular
    velocity and acceleration are 0, as in the devkit's past states (built like the initial state, with steering
    0: navsim navsim/planning/scenario_builder/navsim_scenario_utils.py:34-46), so the comfort check's shift of
    the accelerations to the box centre is zero over the history.
    """
    e = scene.row["ego"]
    t = np.asarray(e["t"], float)
    n = int(round(history_s / dt))
    times = -np.arange(n, 0, -1) * dt  # -1.5 ... -0.1
    times = times[:-1]  # as upstream: history_time_us[:-1]
    times = times[times >= t[0] - 1e-9]
    if len(times) == 0 or t[0] > -1e-9:
        return np.zeros((0, STATE_SIZE))
    h = np.unwrap(np.asarray(e["heading"], float))
    out = np.zeros((len(times), STATE_SIZE))
    out[:, X] = np.interp(times, t, np.asarray(e["x"], float))
    out[:, Y] = np.interp(times, t, np.asarray(e["y"], float))
    out[:, HEADING] = wrap_angle(np.interp(times, t, h))
    out[:, VX] = np.interp(times, t, np.asarray(e["speed"], float))
    out[:, AX] = np.interp(times, t, np.asarray(e["accel"], float))
    out[:, AY] = np.interp(times, t, np.asarray(e["accel_lat"], float))
    return out


def scene_meta(scene) -> tuple[str, float | None]:
    """(log_name, timestamp_s) from the row meta ("" / None if absent)."""
    try:
        m = json.loads(scene.row["meta"])
    except (TypeError, ValueError):
        m = {}
    ts = m.get("timestamp_s")
    return str(m.get("log_name", "")), (None if ts is None else float(ts))
