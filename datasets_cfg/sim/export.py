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

Map semantics (NAVSIM's). A highway-env road segment (edge (from, to)) is a roadblock: its lanes run the same
way. `route_chain` turns the lanes a vehicle followed into a connected chain, one lane per segment;
`export_road` marks every lane of a route segment `on_route`. highway-env leaves gaps of 5-8 m where a
roundabout's entries and exits meet the ring; `sample_road` bridges them with lane connectors
(`ConnectorLane`) so centrelines join.

Used by the scene generator (`episode`) and by closed-loop evaluation: `ego_state(env)`,
`export_vehicles(env, ...)`, `export_road(env, ...)`, `route_chain(...)`, `render_transform(env)`,
`project_to_image(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from common.constants import REAR_AXLE_TO_CENTER  # m, ego rear axle -> box centre (NAVSIM convention, see module doc)
from common.geometry import wrap_angle

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


def junction_kind(env_name: str, edge: tuple[str, str]) -> tuple[str, bool]:
    _from, _to = edge
    if env_name == "intersection" and _from.startswith("ir") and _to.startswith("il"):
        return "lane_connector", True
    if env_name == "roundabout" and _from in _RING_NODES and _to in _RING_NODES:
        return "lane", True
    return "lane", False


JUNCTION_GAP_M = 10.0  # m, longest gap between a lane's end and its successor's start that a connector bridges
JUNCTION_TURN_RAD = np.deg2rad(60.0)  # largest heading change across such a gap


class ConnectorLane:
    """The way across a gap highway-env leaves between a lane's end and the start of a lane it leads to.

    highway-env's roundabouts are not joined up: an entry lane ends 5.6-7.7 m from the ring lane it leads
    into, turned by ~47 deg (the exits likewise); its vehicles simply steer across. A connector is the
    cubic Hermite curve from the end of `a` (position and heading) to the start of `b`, tangent lengths =
    the chord, in highway-env's frame, with `a`'s width: the map exports it as a lane connector (so the
    route's centrelines join) and the ego's path model (`drivers.path_ahead`) curves through it.
    """

    def __init__(self, a, b, samples: int = 41):
        p0, h0 = np.asarray(a.position(a.length, 0.0), float), float(a.heading_at(a.length))
        p1, h1 = np.asarray(b.position(0.0, 0.0), float), float(b.heading_at(0.0))
        chord = float(np.hypot(*(p1 - p0)))
        t0, t1 = chord * np.array([np.cos(h0), np.sin(h0)]), chord * np.array([np.cos(h1), np.sin(h1)])
        u = np.linspace(0.0, 1.0, samples)[:, None]
        pts = (2 * u**3 - 3 * u**2 + 1) * p0 + (u**3 - 2 * u**2 + u) * t0 + (-2 * u**3 + 3 * u**2) * p1 + (u**3 - u**2) * t1
        der = (6 * u**2 - 6 * u) * p0 + (3 * u**2 - 4 * u + 1) * t0 + (-6 * u**2 + 6 * u) * p1 + (3 * u**2 - 2 * u) * t1
        self._s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])
        self._pts = pts
        self._heading = np.unwrap(np.arctan2(der[:, 1], der[:, 0]))
        self.length = float(self._s[-1])
        self.width = float(a.width_at(a.length))
        self.speed_limit = b.speed_limit

    def heading_at(self, longitudinal: float) -> float:
        return float(np.interp(longitudinal, self._s, self._heading))

    def position(self, longitudinal: float, lateral: float) -> np.ndarray:
        x = np.interp(longitudinal, self._s, self._pts[:, 0])
        y = np.interp(longitudinal, self._s, self._pts[:, 1])
        h = self.heading_at(longitudinal)
        return np.array([x, y]) + lateral * np.array([-np.sin(h), np.cos(h)])  # highway-env: lateral grows to the right

    def width_at(self, longitudinal: float) -> float:
        return self.width

    def local_coordinates(self, position) -> tuple[float, float]:
        """(longitudinal, lateral) of a point: its projection on the curve (lateral grows to the right)."""
        p = np.asarray(position, float)
        seg = np.diff(self._pts, axis=0)
        rel = p - self._pts[:-1]
        t = np.clip((rel * seg).sum(1) / np.maximum((seg * seg).sum(1), 1e-12), 0.0, 1.0)
        d = np.hypot(*(rel - t[:, None] * seg).T)
        k = int(np.argmin(d))
        s = float(self._s[k] + t[k] * (self._s[k + 1] - self._s[k]))
        if k == len(seg) - 1 and t[k] >= 1.0:  # past the end: extend along the end tangent
            h = self._heading[-1]
            s = self.length + float(np.dot(p - self._pts[-1], [np.cos(h), np.sin(h)]))
        q = self.position(min(max(s, 0.0), self.length), 0.0)
        h = self.heading_at(s)
        return s, float(np.dot(p - q, [-np.sin(h), np.cos(h)]))


def connector_between(network, a_index, b_index) -> ConnectorLane | None:
    """The connector from lane `a_index` into lane `b_index` if highway-env leaves a bridgeable gap between
    them (more than ROUTE_JOIN_M, at most JUNCTION_GAP_M and JUNCTION_TURN_RAD), else None."""
    a, b = network.get_lane(a_index), network.get_lane(b_index)
    gap = float(np.hypot(*(np.asarray(b.position(0.0, 0.0)) - np.asarray(a.position(a.length, 0.0)))))
    turn = abs(float(np.angle(np.exp(1j * (b.heading_at(0.0) - a.heading_at(a.length))))))
    if ROUTE_JOIN_M < gap <= JUNCTION_GAP_M and turn <= JUNCTION_TURN_RAD:
        return ConnectorLane(a, b)
    return None


def junction_gaps(network) -> list[tuple]:
    """(from lane index, to lane index) of every successor pair that needs a connector: the lane's end meets
    no lane of that next road (within ROUTE_JOIN_M) but a lane of it starts within the gap limits."""
    out = []
    for _from, tos in network.graph.items():
        for _to, lanes in tos.items():
            for i, a in enumerate(lanes):
                end = np.asarray(a.position(a.length, 0.0))
                for nxt, nlanes in network.graph.get(_to, {}).items():
                    gaps = [float(np.hypot(*(np.asarray(b.position(0.0, 0.0)) - end))) for b in nlanes]
                    if min(gaps, default=np.inf) <= ROUTE_JOIN_M:
                        continue
                    for j in range(len(nlanes)):
                        if connector_between(network, (_from, _to, i), (_to, nxt, j)) is not None:
                            out.append(((_from, _to, i), (_to, nxt, j)))
    return out


def sample_road(env, env_name: str = "", step: float = LANE_SAMPLE_STEP) -> list[LaneSamples]:
    """Sample every lane of the road network (centre and both borders) every `step` metres, global frame, plus
    a lane connector (`ConnectorLane`, id "<from lane>~<to lane>") across every gap highway-env leaves at a junction."""
    u = getattr(env, "unwrapped", env)
    lanes = []
    for _from, tos in u.road.network.graph.items():
        for _to, lane_list in tos.items():
            kind, inter = junction_kind(env_name, (_from, _to))
            for i, lane in enumerate(lane_list):
                lanes.append(_samples(lane, lane_id((_from, _to, i)), (_from, _to), kind, inter, step))
    junction = {ln.edge: ln.intersection for ln in lanes}
    for a, b in junction_gaps(u.road.network):
        conn = ConnectorLane(u.road.network.get_lane(a), u.road.network.get_lane(b))
        ida, idb = lane_id(a), lane_id(b)
        lanes.append(_samples(conn, f"{ida}~{idb}", (ida, idb), "lane_connector", junction[a[:2]] or junction[b[:2]], step))
    return lanes


def _samples(lane, id: str, edge: tuple, kind: str, intersection: bool, step: float) -> LaneSamples:
    n = max(2, int(np.ceil(lane.length / step)) + 1)
    s = np.linspace(0.0, lane.length, n)
    half = np.array([lane.width_at(si) for si in s]) / 2.0
    # highway-env lateral coordinates grow to the right of the driving direction
    center = np.array([lane.position(si, 0.0) for si in s])
    left = np.array([lane.position(si, -h) for si, h in zip(s, half)])
    right = np.array([lane.position(si, h) for si, h in zip(s, half)])
    limit = lane.speed_limit
    return LaneSamples(id, edge, kind, intersection, float("nan") if limit is None else float(limit),
                       to_global_xy(center), to_global_xy(left), to_global_xy(right))


def _simplify(points: np.ndarray) -> np.ndarray:
    from shapely import LineString

    if len(points) <= 2:
        return points
    return np.asarray(LineString(points).simplify(SIMPLIFY_TOLERANCE).coords)


ROUTE_JOIN_M = 1.0  # m, a lane leads into the next when its centreline ends this close to the next one's start
ROUTE_TAIL_M = 150.0  # m, route lanes are cropped to the region grown by this (PDM-Closed looks 5 s ahead at 30 m/s)


def _leads_into(a: LaneSamples, b: LaneSamples) -> bool:
    return float(np.hypot(*(a.center[-1] - b.center[0]))) <= ROUTE_JOIN_M


def _lane_number(ln: LaneSamples) -> int:
    return int(ln.id.rsplit("#", 1)[1])


def route_chain(lanes: list[LaneSamples], lane_ids: Iterable[str], anchor: str | None = None) -> list[str]:
    """A connected chain of lanes in driving order, one per road segment, from the lanes a vehicle followed.

    `lane_ids`: the lanes followed, in time order (repeats and parallel lanes of a lane change allowed). Per
    segment (highway-env edge (from, to)) the LAST lane followed in it is kept. Then, from the end backwards,
    a kept lane that does not lead into the next kept lane (its centreline does not end within ROUTE_JOIN_M
    of the next one's start) is joined to it: by the lane connector bridging a junction gap between them
    (`sample_road`), else by the lane of its segment that leads into it directly or through a connector,
    the nearest one by lane number (the vehicle changed lanes in the next segment). Where nothing joins two
    segments, the chain is cut there, keeping the part with the segment of `anchor` (default: the first
    lane). Unknown ids are dropped.
    """
    by_id = {ln.id: ln for ln in lanes}
    by_edge: dict[tuple, list[LaneSamples]] = {}
    for ln in lanes:
        by_edge.setdefault(ln.edge, []).append(ln)
    chain: list[LaneSamples] = []
    for lid in lane_ids:
        ln = by_id.get(lid)
        if ln is None:
            continue
        if chain and chain[-1].edge == ln.edge:
            chain[-1] = ln
        elif not any(c.edge == ln.edge for c in chain):  # a segment is on the route once
            chain.append(ln)
    breaks = []
    for k in range(len(chain) - 2, -1, -1):
        a, b = chain[k], chain[k + 1]
        if _leads_into(a, b):
            continue
        options = []  # (lane of a's segment, connector or None), a itself first
        for alt in sorted(by_edge[a.edge], key=lambda ln: (ln is not a, abs(_lane_number(ln) - _lane_number(a)))):
            if _leads_into(alt, b):
                options.append((alt, None))
            elif f"{alt.id}~{b.id}" in by_id:
                options.append((alt, by_id[f"{alt.id}~{b.id}"]))
        if not options:
            breaks.append(k + 1)  # chain[k] and chain[k + 1] are not connected
            continue
        chain[k], conn = options[0]
        if conn is not None:
            chain.insert(k + 1, conn)
            breaks = [x + 1 for x in breaks]
    anchor_edge = by_id[anchor].edge if anchor in by_id else (chain[0].edge if chain else None)
    at = next((k for k, ln in enumerate(chain) if ln.edge == anchor_edge), 0)
    lo = max([b for b in breaks if b <= at], default=0)
    hi = min([b for b in breaks if b > at], default=len(chain))
    return [ln.id for ln in chain[lo:hi]]


def _same_direction(a: LaneSamples, b: LaneSamples) -> bool:
    """Lanes of one segment run the same way (highway-env builds them so; checked on the chords)."""
    return float(np.dot(a.center[-1] - a.center[0], b.center[-1] - b.center[0])) > 0.0


def export_road(env_or_lanes, region: tuple[float, float, float, float] | None = None, route: Iterable[str] = (), env_name: str = "") -> dict:
    """The schema's `map` struct for the road network, optionally cropped to `region` = (xmin, ymin, xmax, ymax).

    Lanes: centreline in driving direction and a polygon (left border + reversed right border). A lane
    crossing the region is kept from its first to its last sample inside it; a route lane is cropped to the
    region grown by ROUTE_TAIL_M, never dropped, and kept up to its ends where it joins the previous / next
    route lane (so the route's centrelines stay joined). Areas: the union of the lane polygons of each road edge, kind
    "intersection" for junction edges and "roadblock" otherwise. `route` (lane ids in driving order, see
    `route_chain`) is kept as given; `on_route` marks every lane of every road segment (highway-env edge, the
    roadblock) on the route that runs in the same direction, as NAVSIM marks the lanes of its route's
    roadblocks.
    """
    from shapely import Polygon, unary_union

    lanes = env_or_lanes if isinstance(env_or_lanes, list) else sample_road(env_or_lanes, env_name)
    route = [r for r in route]
    in_route = set(route)
    route_lane = {ln.edge: ln for ln in lanes if ln.id in in_route}
    out_lanes, edge_polys, edge_inter = [], {}, {}
    position = {r: k for k, r in enumerate(route)}
    for ln in lanes:
        on_route = ln.edge in route_lane and _same_direction(ln, route_lane[ln.edge])
        keep = slice(None)
        if region is not None:
            k = position.get(ln.id)
            grow = ROUTE_TAIL_M if k is not None else 0.0  # the route reaches past the region (planners look ahead)
            xmin, ymin, xmax, ymax = region[0] - grow, region[1] - grow, region[2] + grow, region[3] + grow
            c = ln.center
            inside = (c[:, 0] >= xmin) & (c[:, 0] <= xmax) & (c[:, 1] >= ymin) & (c[:, 1] <= ymax)
            idx = np.flatnonzero(inside)
            if k is not None:  # a route lane is never dropped, nor cut where it joins its route neighbours
                idx = idx if len(idx) else np.arange(len(c))
                if k > 0:
                    idx = np.r_[0, idx]
                if k < len(route) - 1:
                    idx = np.r_[idx, len(c) - 1]
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
            "polygon": ring.tolist(), "speed_limit": ln.speed_limit, "on_route": bool(on_route),
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
