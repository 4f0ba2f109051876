"""Export highway-env state (road network, vehicles, ego, render transform) into ScenePool terms.

Frames. highway-env draws its world with x to the right and y *down* the screen, so its frame is a mirror
image of a map frame (a car changing to its "LANE_LEFT" moves towards -y). The ScenePool "global" frame is
that world mirrored about the x axis:

    x_global = x_sim,   y_global = -y_sim,   heading_global = -heading_sim

so +y is to the left of a car heading +x, headings are counter-clockwise, and "up" in a render is +y.

Reference point. The ego pose of a row is its rear axle, like NAVSIM. highway-env vehicles are boxes of
LENGTH x WIDTH around their position; we put the ego rear axle `REAR_AXLE_TO_CENTER` m (NAVSIM's value)
behind the box centre, so a NAVSIM-style scorer that assumes that offset places the ego box where the
simulator has it. Agents are box centres, as in the schema.

Used by the scene generator (`sim_episode`) and by closed-loop evaluation: `ego_state(env)`,
`export_vehicles(env, ...)`, `export_road(env, ...)`, `render_transform(env)`, `project_to_image(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from datasets_cfg.geometry import wrap_angle

REAR_AXLE_TO_CENTER = 1.461  # m, ego rear axle -> box centre (NAVSIM convention, see module doc)
AGENT_RADIUS = 80.0  # m, agents farther than this from the ego centre are not exported
# highway-env is 2-D: heights are ours (simulated), per category
HEIGHTS = {"vehicle": 1.6, "traffic_cone": 0.7, "barrier": 1.0, "generic_object": 1.0}
LANE_SAMPLE_STEP = 2.0  # m along a lane between exported centreline points (before simplification)
SIMPLIFY_TOLERANCE = 0.02  # m, collinear points are dropped from exported polylines


# ----------------------------------------------------------------------------------------------
# frame conversion


def to_global_xy(xy_sim) -> np.ndarray:
    """(..., 2) highway-env positions -> global frame (mirror y)."""
    out = np.array(xy_sim, dtype=np.float64, copy=True)
    out[..., 1] *= -1.0
    return out


def to_sim_xy(xy_global) -> np.ndarray:
    """Inverse of `to_global_xy` (the mirror is its own inverse)."""
    return to_global_xy(xy_global)


def to_global_heading(heading_sim):
    return wrap_angle(-np.asarray(heading_sim, dtype=np.float64))


# ----------------------------------------------------------------------------------------------
# ego


def yaw_rate_sim(vehicle) -> float:
    """Yaw rate (rad/s, simulator frame) of highway-env's kinematic bicycle at its current steering command.

    Same expression as `Vehicle.step`: slip angle beta = atan(tan(delta) / 2), yaw rate = v sin(beta) / (L / 2).
    """
    delta = float(vehicle.action.get("steering", 0.0)) if isinstance(vehicle.action, dict) else 0.0
    beta = np.arctan(0.5 * np.tan(delta))
    return float(vehicle.speed * np.sin(beta) / (vehicle.LENGTH / 2.0))


def ego_state(env_or_vehicle) -> dict:
    """Current ego state in the global frame, rear axle (keys match the schema's ego fields, minus `t`).

    speed: signed longitudinal speed (m/s); accel: the longitudinal acceleration command being integrated
    (m/s², what `Vehicle.step` adds to the speed); yaw_rate (rad/s, +ccw); accel_lat = speed * yaw_rate
    (m/s², centripetal, +left). Also returns the box centre, size and the lane the simulator puts the ego on.
    """
    v = getattr(env_or_vehicle, "unwrapped", env_or_vehicle)
    v = getattr(v, "vehicle", v)
    center = to_global_xy(v.position)
    heading = float(to_global_heading(v.heading))
    direction = np.array([np.cos(heading), np.sin(heading)])
    rear = center - REAR_AXLE_TO_CENTER * direction
    yaw_rate = -yaw_rate_sim(v)  # mirrored frame: clockwise on screen is counter-clockwise on the map
    accel = float(v.action.get("acceleration", 0.0)) if isinstance(v.action, dict) else 0.0
    return {
        "x": float(rear[0]), "y": float(rear[1]), "heading": heading, "speed": float(v.speed),
        "accel": accel, "accel_lat": float(v.speed * yaw_rate), "yaw_rate": yaw_rate,
        "center": center.tolist(), "length": float(v.LENGTH), "width": float(v.WIDTH),
        "lane_id": lane_id(v.lane_index) if v.lane_index is not None else "", "crashed": bool(v.crashed),
    }


def ego_center_from_rear(x, y, heading):
    """Box centre of the ego from its rear-axle pose (arrays broadcast)."""
    return np.stack([np.asarray(x) + REAR_AXLE_TO_CENTER * np.cos(heading), np.asarray(y) + REAR_AXLE_TO_CENTER * np.sin(heading)], -1)


# ----------------------------------------------------------------------------------------------
# agents


def object_category(obj) -> str:
    """ScenePool category of a highway-env road object (vehicles, and obstacles we or the env placed)."""
    from highway_env.vehicle.kinematics import Vehicle

    if isinstance(obj, Vehicle):
        return "vehicle"
    return getattr(obj, "CATEGORY", "barrier")  # highway-env's own Obstacle blocks a lane end: a barrier


def object_color(obj) -> str:
    """Colour name of the object as highway-env draws it (appearance for annotations)."""
    from highway_env.vehicle.behavior import IDMVehicle, LinearVehicle
    from highway_env.vehicle.kinematics import Vehicle

    if getattr(obj, "crashed", False):
        return "red"
    if not isinstance(obj, Vehicle):
        return "yellow"
    if isinstance(obj, LinearVehicle):
        return "yellow"
    if isinstance(obj, IDMVehicle):
        return "blue"
    return "green"


class TrackIds:
    """Stable string ids for simulator objects within one episode (by first appearance order)."""

    def __init__(self):
        self._ids: dict[int, str] = {}
        self._keep: list = []  # hold references so ids of dead objects are never reused

    def __call__(self, obj) -> str:
        key = id(obj)
        if key not in self._ids:
            prefix = "v" if object_category(obj) == "vehicle" else "o"
            self._ids[key] = f"{prefix}{len(self._ids):03d}"
            self._keep.append(obj)
        return self._ids[key]


def export_vehicles(env, frame_index: int, track_ids: TrackIds | None = None, radius: float = AGENT_RADIUS) -> dict:
    """Agents (vehicles and static objects except the ego) near the ego, as one frame of the schema's `agents` struct.

    Returns equal-length lists: frame, track_id, category, x, y, heading, length, width, height, vx, vy
    (global frame, box centres), plus `color` and `crashed` (not schema fields; drop them before a row).
    """
    u = getattr(env, "unwrapped", env)
    ego = u.vehicle
    track_ids = track_ids or TrackIds()
    out: dict[str, list] = {k: [] for k in ("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy", "color", "crashed")}
    for obj in list(u.road.vehicles) + list(u.road.objects):
        if obj is ego or np.hypot(*(obj.position - ego.position)) > radius:
            continue
        cat = object_category(obj)
        xy = to_global_xy(obj.position)
        vel = to_global_xy(obj.velocity) if cat == "vehicle" else np.zeros(2)
        out["frame"].append(int(frame_index))
        out["track_id"].append(track_ids(obj))
        out["category"].append(cat)
        out["x"].append(float(xy[0]))
        out["y"].append(float(xy[1]))
        out["heading"].append(float(to_global_heading(obj.heading)))
        out["length"].append(float(obj.LENGTH))
        out["width"].append(float(obj.WIDTH))
        out["height"].append(HEIGHTS.get(cat, 1.0))
        out["vx"].append(float(vel[0]))
        out["vy"].append(float(vel[1]))
        out["color"].append(object_color(obj))
        out["crashed"].append(bool(getattr(obj, "crashed", False)))
    return out


# ----------------------------------------------------------------------------------------------
# road network


def lane_id(index) -> str:
    """String id of a highway-env lane index (from, to, i)."""
    _from, _to, i = index
    return f"{_from}>{_to}#{0 if i is None else int(i)}"


@dataclass
class LaneSamples:
    """One lane sampled along its length, global frame."""

    id: str
    edge: tuple[str, str]
    kind: str  # "lane" | "lane_connector"
    intersection: bool  # the lane lies in a junction (intersection box or roundabout ring)
    speed_limit: float
    center: np.ndarray  # (n, 2)
    left: np.ndarray  # (n, 2)
    right: np.ndarray  # (n, 2)


# Junction edges per environment: lanes inside an intersection are lane connectors; roundabout ring lanes
# are ordinary lanes but their drivable area is an "intersection" area.
_RING_NODES = {"se", "ex", "ee", "nx", "ne", "wx", "we", "sx"}


def _junction(env_name: str, edge: tuple[str, str]) -> tuple[str, bool]:
    _from, _to = edge
    if env_name == "intersection" and _from.startswith("ir") and _to.startswith("il"):
        return "lane_connector", True
    if env_name == "roundabout" and _from in _RING_NODES and _to in _RING_NODES:
        return "lane", True
    return "lane", False


def sample_road(env, env_name: str = "", step: float = LANE_SAMPLE_STEP) -> list[LaneSamples]:
    """Sample every lane of the road network (centre and both borders) every `step` metres, global frame."""
    u = getattr(env, "unwrapped", env)
    lanes = []
    for _from, tos in u.road.network.graph.items():
        for _to, lane_list in tos.items():
            kind, inter = _junction(env_name, (_from, _to))
            for i, lane in enumerate(lane_list):
                n = max(2, int(np.ceil(lane.length / step)) + 1)
                s = np.linspace(0.0, lane.length, n)
                half = np.array([lane.width_at(si) for si in s]) / 2.0
                # highway-env lateral coordinates grow to the right of the driving direction
                center = np.array([lane.position(si, 0.0) for si in s])
                left = np.array([lane.position(si, -h) for si, h in zip(s, half)])
                right = np.array([lane.position(si, h) for si, h in zip(s, half)])
                limit = lane.speed_limit
                lanes.append(LaneSamples(
                    lane_id((_from, _to, i)), (_from, _to), kind, inter,
                    float("nan") if limit is None else float(limit),
                    to_global_xy(center), to_global_xy(left), to_global_xy(right),
                ))
    return lanes


def _simplify(points: np.ndarray) -> np.ndarray:
    from shapely import LineString

    if len(points) <= 2:
        return points
    return np.asarray(LineString(points).simplify(SIMPLIFY_TOLERANCE).coords)


def export_road(env_or_lanes, region: tuple[float, float, float, float] | None = None, route: Iterable[str] = (), env_name: str = "") -> dict:
    """The schema's `map` struct for the road network, optionally cropped to `region` = (xmin, ymin, xmax, ymax).

    Lanes: centreline in driving direction and a polygon (left border + reversed right border). A lane
    crossing the region is kept from its first to its last sample inside it. Areas: the union of the lane
    polygons of each road edge, kind "intersection" for junction edges and "roadblock" otherwise. `route`
    (lane ids in driving order) is kept as given and marks those lanes `on_route`.
    """
    from shapely import Polygon, unary_union

    lanes = env_or_lanes if isinstance(env_or_lanes, list) else sample_road(env_or_lanes, env_name)
    route = [r for r in route]
    on_route = set(route)
    out_lanes, edge_polys, edge_inter = [], {}, {}
    for ln in lanes:
        keep = slice(None)
        if region is not None:
            xmin, ymin, xmax, ymax = region
            c = ln.center
            inside = (c[:, 0] >= xmin) & (c[:, 0] <= xmax) & (c[:, 1] >= ymin) & (c[:, 1] <= ymax)
            if ln.id in on_route and not inside.any():
                inside[:] = True  # never drop a route lane
            idx = np.flatnonzero(inside)
            if len(idx) == 0:
                continue
            lo, hi = idx[0], idx[-1] + 1
            if hi - lo < 2:
                lo, hi = max(0, lo - 1), min(len(c), hi + 1)
            keep = slice(lo, hi)
        center, left, right = ln.center[keep], ln.left[keep], ln.right[keep]
        ring = np.concatenate([_simplify(left), _simplify(right)[::-1]])
        poly = Polygon(ring)
        if not poly.is_valid:
            poly = poly.buffer(0)
        out_lanes.append({
            "id": ln.id, "kind": ln.kind, "centerline": _simplify(center).tolist(),
            "polygon": ring.tolist(), "speed_limit": ln.speed_limit, "on_route": ln.id in on_route,
        })
        if not poly.is_empty:
            edge_polys.setdefault(ln.edge, []).append(poly.buffer(0.05, join_style="mitre"))
            edge_inter[ln.edge] = ln.intersection
    areas = []
    for edge, polys in edge_polys.items():
        merged = unary_union(polys).simplify(0.05)
        parts = list(merged.geoms) if hasattr(merged, "geoms") else [merged]
        for k, p in enumerate(q for q in parts if q.area > 0.5):
            areas.append({
                "id": f"{edge[0]}>{edge[1]}" + (f":{k}" if k else ""),
                "kind": "intersection" if edge_inter[edge] else "roadblock",
                "polygon": np.asarray(p.exterior.coords)[:-1].tolist(),
            })
    return {"lanes": out_lanes, "areas": areas, "route": route}


# ----------------------------------------------------------------------------------------------
# render transform


@dataclass
class RenderTransform:
    """World -> pixel map of a highway-env top-down render (`WorldSurface.pos2pix`), in global coordinates.

    The render is world-aligned (not rotated with the ego): pixel u grows with global x, pixel v grows with
    *decreasing* global y (the mirror in this module's doc), centred on `center_xy` (the ego box centre).
    """

    center_xy: tuple[float, float]
    pixels_per_meter: float
    image_size: tuple[int, int]  # (width, height)
    centering: tuple[float, float] = (0.5, 0.5)
    extra: dict[str, Any] = field(default_factory=dict)

    def project(self, xy_global) -> np.ndarray:
        """(..., 2) global points -> (..., 2) continuous pixel coordinates (u right, v down, origin top-left)."""
        xy = np.asarray(xy_global, dtype=np.float64)
        w, h = self.image_size
        u = self.centering[0] * w + (xy[..., 0] - self.center_xy[0]) * self.pixels_per_meter
        v = self.centering[1] * h - (xy[..., 1] - self.center_xy[1]) * self.pixels_per_meter
        return np.stack([u, v], -1)

    def unproject(self, uv) -> np.ndarray:
        uv = np.asarray(uv, dtype=np.float64)
        w, h = self.image_size
        x = self.center_xy[0] + (uv[..., 0] - self.centering[0] * w) / self.pixels_per_meter
        y = self.center_xy[1] - (uv[..., 1] - self.centering[1] * h) / self.pixels_per_meter
        return np.stack([x, y], -1)

    def to_meta(self) -> dict:
        return {"center_xy": [float(c) for c in self.center_xy], "pixels_per_meter": float(self.pixels_per_meter),
                "image_size": [int(s) for s in self.image_size], "centering": [float(c) for c in self.centering], "y_axis": "up"}


def render_transform(env) -> RenderTransform:
    """The transform of the env's current render (call right after `env.render()`)."""
    u = getattr(env, "unwrapped", env)
    surf = u.viewer.sim_surface
    center = to_global_xy(u.viewer.window_position())
    return RenderTransform((float(center[0]), float(center[1])), float(surf.scaling), (surf.get_width(), surf.get_height()), tuple(surf.centering_position))


def scene_render_transform(scene_or_row, frame: int | None = None) -> RenderTransform:
    """The render transform stored in a sim row's meta for `frame` (default: the current frame)."""
    import json

    row = getattr(scene_or_row, "row", scene_or_row)
    meta = json.loads(row["meta"])
    r = meta.get("render")
    if not r:
        raise KeyError(f"scene {row['id']!r}: meta has no 'render' entry (not a simulator scene?)")
    frame = int(row["current_index"]) if frame is None else int(frame)
    centers = r["frames"]
    if str(frame) not in centers:
        raise KeyError(f"scene {row['id']!r}: no render for frame {frame}; rendered frames: {sorted(centers, key=int)}")
    return RenderTransform(tuple(centers[str(frame)]), r["pixels_per_meter"], tuple(r["image_size"]), tuple(r.get("centering", (0.5, 0.5))))


def project_to_image(scene_or_row, xy_global, frame: int | None = None) -> np.ndarray:
    """Global (..., 2) points -> pixel coordinates (u, v) in the scene's render of `frame` (default current)."""
    return scene_render_transform(scene_or_row, frame).project(xy_global)
