"""Map geometry for NAVSIM scenes in a small, documented GeoJSON file (nuPlan map files cannot be shipped).

File format ("mose-navsim-map", version 1)
-----------------------------------------
A GeoJSON ``FeatureCollection``. Coordinates are **metres in the nuPlan map frame** of the location (the
frame of ``ego2global_translation`` in the log pickles), not longitude/latitude; a third coordinate (z) is
allowed and ignored. Foreign members at the top level (all optional)::

    {"type": "FeatureCollection",
     "format": "mose-navsim-map/1",           # if present, must be exactly this
     "location": "us-nv-las-vegas-strip",     # the map_location this file describes; "" or absent: any
     "features": [ ... ]}

Every feature has ``properties.id`` (string or integer, unique in the file) and ``properties.kind``:

- ``lane`` / ``lane_connector``: geometry is a ``LineString`` (the centreline, in driving direction), or a
  ``GeometryCollection`` of exactly one ``LineString`` (centreline) and at most one ``Polygon`` (the lane
  area). Further properties: ``roadblock_id`` (the roadblock / roadblock connector the lane belongs to;
  needed for the route), ``speed_limit`` (m/s, number or null), ``outgoing`` (optional list of successor
  lane ids; when absent, successors are the lanes whose centreline starts within ``connect_tol`` metres of
  this centreline's end).
- ``roadblock`` / ``roadblock_connector`` / ``intersection`` / ``carpark``: geometry is a ``Polygon``
  (drivable area). Only the exterior ring is used; holes are ignored.

Any other kind, a missing property, a wrong geometry type or a non-finite coordinate is an error that names
the file, the feature index and the field. `write_map` writes this format (atomically).

Per scene, `NavsimMap.scene_map` returns the schema's ``map`` struct: the lanes and areas within ``radius``
metres of the ego path, ``on_route`` = the lane's roadblock is in the frame's ``roadblock_ids``, and the
``route`` as a chain of connected on-route lanes in driving order (see `NavsimMap.route`).
"""
from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from common.atomic import write_json
from common.geometry import wrap_angle
from datasets_cfg.schema import AREA_KINDS, LANE_KINDS, SchemaError

FORMAT = "mose-navsim-map/1"
KINDS = LANE_KINDS + AREA_KINDS


class MapFormatError(SchemaError):
    """A map file does not follow the format above. The message names the file, the feature and the field."""


@dataclass(frozen=True)
class MapLane:
    id: str
    kind: str  # "lane" | "lane_connector"
    centerline: np.ndarray  # (n >= 2, 2) m, driving direction
    polygon: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (m, 2) exterior ring, not closed
    speed_limit: float = math.nan  # m/s
    roadblock_id: str = ""
    outgoing: tuple[str, ...] | None = None  # None: infer from geometry


@dataclass(frozen=True)
class MapArea:
    id: str
    kind: str  # one of AREA_KINDS
    polygon: np.ndarray  # (m >= 3, 2) exterior ring, not closed


# ----------------------------------------------------------------------------------------------
# reading


def _err(path, where: str, field: str, expected: str, got: Any) -> MapFormatError:
    got_s = repr(got)
    got_s = got_s if len(got_s) <= 100 else got_s[:97] + "..."
    return MapFormatError(f"{path}: {where}: field '{field}': expected {expected}, got {got_s}")


def _coords(value: Any, path, where: str, field: str, min_points: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _err(path, where, field, "a list of [x, y] positions in metres", value) from None
    if arr.ndim != 2 or arr.shape[1] not in (2, 3) or len(arr) < min_points:
        raise _err(path, where, field, f"a list of at least {min_points} [x, y] positions", value)
    if not np.isfinite(arr).all():
        raise _err(path, where, field, "finite coordinates", value)
    return arr[:, :2]


def _ring(value: Any, path, where: str, field: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise _err(path, where, field, "Polygon coordinates: a list of linear rings", value)
    ring = _coords(value[0], path, where, f"{field}[0]", 3)
    if len(ring) > 3 and np.allclose(ring[0], ring[-1]):
        ring = ring[:-1]  # GeoJSON rings are closed; the schema stores them open
    if len(ring) < 3:
        raise _err(path, where, field, "a ring of at least 3 distinct positions", value[0])
    return ring


def _id(value: Any, path, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise _err(path, where, field, "a non-empty string or integer id", value)
    return str(value)


def _lane_geometry(geom: dict, path, where: str) -> tuple[np.ndarray, np.ndarray]:
    gtype = geom.get("type")
    if gtype == "LineString":
        return _coords(geom.get("coordinates"), path, where, "geometry.coordinates", 2), np.zeros((0, 2))
    if gtype != "GeometryCollection":
        raise _err(path, where, "geometry.type", "LineString or GeometryCollection (LineString + Polygon) for a lane", gtype)
    parts = geom.get("geometries")
    if not isinstance(parts, list):
        raise _err(path, where, "geometry.geometries", "a list of geometries", parts)
    lines = [g for g in parts if isinstance(g, dict) and g.get("type") == "LineString"]
    polys = [g for g in parts if isinstance(g, dict) and g.get("type") == "Polygon"]
    if len(lines) != 1 or len(polys) > 1 or len(lines) + len(polys) != len(parts):
        raise _err(path, where, "geometry.geometries", "exactly one LineString (centreline) and at most one Polygon", [g.get("type") if isinstance(g, dict) else g for g in parts])
    centerline = _coords(lines[0].get("coordinates"), path, where, "geometry.geometries.LineString.coordinates", 2)
    polygon = _ring(polys[0].get("coordinates"), path, where, "geometry.geometries.Polygon.coordinates") if polys else np.zeros((0, 2))
    return centerline, polygon


def _speed(value: Any, path, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _err(path, where, "properties.speed_limit", "a non-negative number of m/s or null", value)
    return float(value)


def parse_map(obj: Any, path: str | os.PathLike = "<map>") -> "NavsimMap":
    """Build a `NavsimMap` from a decoded GeoJSON object; `path` only names the source in errors."""
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection":
        raise _err(path, "top level", "type", "a GeoJSON FeatureCollection", obj.get("type") if isinstance(obj, dict) else type(obj).__name__)
    if "format" in obj and obj["format"] != FORMAT:
        raise _err(path, "top level", "format", repr(FORMAT), obj["format"])
    location = obj.get("location") or ""
    if not isinstance(location, str):
        raise _err(path, "top level", "location", "a map location name (string)", location)
    features = obj.get("features")
    if not isinstance(features, list):
        raise _err(path, "top level", "features", "a list of features", features)
    lanes: list[MapLane] = []
    areas: list[MapArea] = []
    seen: dict[str, int] = {}
    for i, feat in enumerate(features):
        where = f"features[{i}]"
        if not isinstance(feat, dict) or not isinstance(feat.get("properties"), dict) or not isinstance(feat.get("geometry"), dict):
            raise _err(path, where, "properties/geometry", "a Feature with a properties object and a geometry", feat)
        props, geom = feat["properties"], feat["geometry"]
        fid = _id(props.get("id"), path, where, "properties.id")
        where = f"features[{i}] (id={fid!r})"
        if fid in seen:
            raise _err(path, where, "properties.id", f"ids unique in the file (also used by features[{seen[fid]}])", fid)
        seen[fid] = i
        kind = props.get("kind")
        if kind not in KINDS:
            raise _err(path, where, "properties.kind", f"one of {list(KINDS)}", kind)
        if kind in LANE_KINDS:
            centerline, polygon = _lane_geometry(geom, path, where)
            rb = props.get("roadblock_id")
            outgoing = props.get("outgoing")
            if outgoing is not None:
                if not isinstance(outgoing, list):
                    raise _err(path, where, "properties.outgoing", "a list of lane ids", outgoing)
                outgoing = tuple(_id(o, path, where, "properties.outgoing[]") for o in outgoing)
            lanes.append(MapLane(fid, kind, centerline, polygon, _speed(props.get("speed_limit"), path, where),
                                 "" if rb is None else _id(rb, path, where, "properties.roadblock_id"), outgoing))
        else:
            if geom.get("type") != "Polygon":
                raise _err(path, where, "geometry.type", f"Polygon for a {kind}", geom.get("type"))
            areas.append(MapArea(fid, kind, _ring(geom.get("coordinates"), path, where, "geometry.coordinates")))
    return NavsimMap(lanes, areas, location=location, source=str(path))


def load_map(path: str | os.PathLike) -> "NavsimMap":
    """Read a map file (plain JSON; no code runs). Errors name the file, the feature and the field."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: map file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MapFormatError(f"{path}: not valid JSON ({exc}); expected a GeoJSON FeatureCollection") from None
    return parse_map(obj, path)


# ----------------------------------------------------------------------------------------------
# writing


def _close(ring: np.ndarray) -> list:
    pts = np.asarray(ring, float).tolist()
    return pts + [pts[0]] if pts and pts[0] != pts[-1] else pts


def _as_lane(x: MapLane | Mapping) -> MapLane:
    if isinstance(x, MapLane):
        return x
    out = x.get("outgoing")
    return MapLane(str(x["id"]), x.get("kind", "lane"), np.asarray(x["centerline"], float),
                   np.asarray(x.get("polygon", np.zeros((0, 2))), float).reshape(-1, 2),
                   float("nan") if x.get("speed_limit") is None else float(x["speed_limit"]),
                   str(x.get("roadblock_id", "") or ""), None if out is None else tuple(str(o) for o in out))


def _as_area(x: MapArea | Mapping) -> MapArea:
    return x if isinstance(x, MapArea) else MapArea(str(x["id"]), x["kind"], np.asarray(x["polygon"], float))


def to_geojson(lanes: Iterable[MapLane | Mapping] = (), areas: Iterable[MapArea | Mapping] = (), location: str = "") -> dict:
    """The GeoJSON object for these map elements (lanes/areas as dataclasses or dicts with the same keys)."""
    features = []
    for lane in map(_as_lane, lanes):
        line = {"type": "LineString", "coordinates": np.asarray(lane.centerline, float).tolist()}
        geom = line if not len(lane.polygon) else {
            "type": "GeometryCollection", "geometries": [line, {"type": "Polygon", "coordinates": [_close(lane.polygon)]}]}
        props = {"id": lane.id, "kind": lane.kind, "roadblock_id": lane.roadblock_id or None,
                 "speed_limit": None if math.isnan(lane.speed_limit) else lane.speed_limit}
        if lane.outgoing is not None:
            props["outgoing"] = list(lane.outgoing)
        features.append({"type": "Feature", "properties": props, "geometry": geom})
    for area in map(_as_area, areas):
        features.append({"type": "Feature", "properties": {"id": area.id, "kind": area.kind},
                         "geometry": {"type": "Polygon", "coordinates": [_close(area.polygon)]}})
    return {"type": "FeatureCollection", "format": FORMAT, "location": location, "features": features}


def write_map(path: str | os.PathLike, lanes: Iterable[MapLane | Mapping] = (), areas: Iterable[MapArea | Mapping] = (), location: str = "") -> Path:
    """Write a map file atomically. It is validated by reading it back in memory first."""
    obj = to_geojson(lanes, areas, location)
    parse_map(obj, path)  # refuse to write a file we could not read
    write_json(path, obj, indent=None)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# querying


def _heading_at(line: np.ndarray, xy: np.ndarray) -> tuple[float, float]:
    """(distance from xy to the polyline, polyline heading at the closest segment)."""
    a, b = line[:-1], line[1:]
    ab = b - a
    denom = np.maximum((ab**2).sum(1), 1e-12)
    s = np.clip(((xy - a) * ab).sum(1) / denom, 0.0, 1.0)
    d = np.hypot(*(a + s[:, None] * ab - xy).T)
    k = int(np.argmin(d))
    return float(d[k]), float(math.atan2(ab[k, 1], ab[k, 0]))


class NavsimMap:
    """Lanes and drivable areas of one location, with the spatial queries a scene needs."""

    START_SEARCH = 20.0  # m: where to look for the lane the ego is on before considering every route lane

    def __init__(self, lanes: Sequence[MapLane] = (), areas: Sequence[MapArea] = (), location: str = "", source: str = "<memory>", connect_tol: float = 0.5):
        self.lanes = {l.id: l for l in lanes}
        self.areas = {a.id: a for a in areas}
        self.location = location
        self.source = source
        self.connect_tol = connect_tol
        self._trees = None
        self._succ: dict[str, list[str]] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NavsimMap":
        return load_map(path)

    def save(self, path: str | os.PathLike) -> Path:
        return write_map(path, self.lanes.values(), self.areas.values(), self.location)

    def __repr__(self) -> str:
        return f"NavsimMap({self.source!r}, location={self.location!r}, {len(self.lanes)} lanes, {len(self.areas)} areas)"

    # spatial index ---------------------------------------------------------------------------
    def _index(self):
        if self._trees is None:
            from shapely import LineString, Point, Polygon, STRtree

            self._lane_ids = list(self.lanes)
            lane_geoms = [Polygon(l.polygon) if len(l.polygon) >= 3 else LineString(l.centerline) for l in self.lanes.values()]
            self._area_ids = list(self.areas)
            self._starts = STRtree([Point(l.centerline[0]) for l in self.lanes.values()])
            self._trees = (STRtree(lane_geoms), STRtree([Polygon(a.polygon) for a in self.areas.values()]))
            self._lane_geoms = dict(zip(self._lane_ids, lane_geoms))
        return self._trees

    def near(self, region) -> tuple[list[str], list[str]]:
        """Ids of lanes and areas intersecting a shapely `region`, in file order."""
        lanes_tree, areas_tree = self._index()
        li = sorted(lanes_tree.query(region, predicate="intersects")) if self.lanes else []
        ai = sorted(areas_tree.query(region, predicate="intersects")) if self.areas else []
        return [self._lane_ids[i] for i in li], [self._area_ids[i] for i in ai]

    def successors(self, lane_id: str) -> list[str]:
        """Lanes that continue `lane_id`: its `outgoing` list, else lanes starting within `connect_tol` of its end."""
        if self._succ is None:
            self._succ = {}
        if lane_id not in self._succ:
            lane = self.lanes[lane_id]
            if lane.outgoing is not None:
                out = [o for o in lane.outgoing if o in self.lanes]
            else:
                from shapely import Point

                self._index()
                hits = self._starts.query(Point(lane.centerline[-1]), predicate="dwithin", distance=self.connect_tol)
                out = [self._lane_ids[i] for i in sorted(hits) if self._lane_ids[i] != lane_id]
            self._succ[lane_id] = out
        return self._succ[lane_id]

    # route ------------------------------------------------------------------------------------
    def route(self, roadblock_ids: Sequence[str], ego_pose: Sequence[float]) -> list[str]:
        """The route as connected lanes in driving order.

        Start lane: among lanes whose roadblock is on the route (within `START_SEARCH` m if any), one whose
        polygon contains the ego position, else the one minimising (distance to its centreline in m + heading
        difference in rad). From there a
        breadth-first search over successors that stay on route roadblocks (never going back in route
        order) keeps the path that reaches the furthest route roadblock (fewest lanes on ties).
        """
        order = {str(b): i for i, b in enumerate(dict.fromkeys(str(b) for b in roadblock_ids))}
        from shapely import Point

        xy = np.asarray(ego_pose[:2], float)
        pt = Point(xy)
        lanes_tree, _ = self._index()
        # start-lane candidates: on-route lanes within START_SEARCH m (all on-route lanes if none is that close)
        near = [self._lane_ids[i] for i in sorted(lanes_tree.query(pt, predicate="dwithin", distance=self.START_SEARCH))] if self.lanes else []
        cands = [self.lanes[i] for i in near if self.lanes[i].roadblock_id in order]
        if not cands:
            cands = [l for l in self.lanes.values() if l.roadblock_id in order]
        if not cands:
            return []

        def cost(lane: MapLane):
            inside = len(lane.polygon) >= 3 and self._lane_geoms[lane.id].covers(pt)
            d, h = _heading_at(lane.centerline, xy)
            return (not inside, d + abs(float(wrap_angle(h - ego_pose[2]))), order[lane.roadblock_id])

        start = min(cands, key=cost).id
        parent = {start: None}
        best = (order[self.lanes[start].roadblock_id], 0, start)
        queue = deque([(start, 0)])
        while queue:
            cur, depth = queue.popleft()
            for nxt in self.successors(cur):
                rb = self.lanes[nxt].roadblock_id
                if nxt in parent or rb not in order or order[rb] < order[self.lanes[cur].roadblock_id]:
                    continue
                parent[nxt] = cur
                queue.append((nxt, depth + 1))
                if order[rb] > best[0]:
                    best = (order[rb], depth + 1, nxt)
        chain, cur = [], best[2]
        while cur is not None:
            chain.append(cur)
            cur = parent[cur]
        return chain[::-1]

    # one scene --------------------------------------------------------------------------------
    def scene_map(self, ego_xy: np.ndarray, ego_pose: Sequence[float], roadblock_ids: Sequence[str], radius: float = 100.0, extra_lane_ids: Iterable[str] = ()) -> dict:
        """The schema's ``map`` struct for a scene: elements within `radius` m of the ego positions `ego_xy`
        (T, 2), plus `extra_lane_ids` (e.g. lane connectors with a traffic light), ``on_route`` flags and the
        route chain from `ego_pose` (the current pose), cut at the first lane outside the region."""
        from shapely import LineString, MultiPoint

        pts = np.asarray(ego_xy, float).reshape(-1, 2)
        region = (LineString(pts) if len(np.unique(pts, axis=0)) > 1 else MultiPoint(pts)).buffer(radius)
        lane_ids, area_ids = self.near(region)
        on_route_blocks = {str(b) for b in roadblock_ids}
        self._index()
        route = []
        for lid in self.route(roadblock_ids, ego_pose):
            if not self._lane_geoms[lid].intersects(region):
                break
            route.append(lid)
        keep = set(lane_ids) | set(route) | {l for l in extra_lane_ids if l in self.lanes}
        lanes = [
            {"id": l.id, "kind": l.kind, "centerline": l.centerline.tolist(), "polygon": l.polygon.tolist(),
             "speed_limit": l.speed_limit, "on_route": l.roadblock_id in on_route_blocks}
            for l in self.lanes.values() if l.id in keep
        ]
        areas = [{"id": a, "kind": self.areas[a].kind, "polygon": self.areas[a].polygon.tolist()} for a in area_ids]
        return {"lanes": lanes, "areas": areas, "route": route}
