"""Predictions in and scores out.

Predictions map a scene token to N poses (x [m], y [m], heading [rad]) in that scene's current ego
rear-axle frame (+x forward, +y left), at `interval_s`, 2*`interval_s`, ... (the t = 0 pose is NOT
included; NAVSIM's default is 8 poses every 0.5 s). Three file forms are read:

JSON (`.json`)::

    {"format": "navsim-trajectories", "version": 1, "frame": "ego_rear_axle", "interval_s": 0.5,
     "trajectories": {"<token>": [[x, y, heading], ...], ...}}

  (a bare {"<token>": [[x, y, heading], ...]} object is accepted too).

CSV (`.csv`), one row per pose, poses of a token in `pose` order (0 = the first future pose)::

    token,pose,x,y,heading

NAVSIM submission pickle (`.pkl`): {"team_name": ..., "predictions": [{token: Trajectory}]} as written by the
devkit's run_create_submission_pickle.py, where Trajectory has `.poses` (N, 3) and
`.trajectory_sampling.interval_length`. Pickles can run arbitrary code when loaded, so we never call
`pickle.load`: a restricted unpickler accepts only numpy arrays and NAVSIM's Trajectory / nuPlan's
TrajectorySampling (rebuilt as plain records, the devkit need not be installed) and refuses any other
class by name. Still, only read pickles you were given for this purpose.

Scores are written as the official v2 CSV (token, valid, the nine sub-metric columns, score; plus our
columns tracking, metric, reason, human_filter_lifted) with a final "average_all_frames" row, atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import pickle
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.atomic import atomic_path, write_json
from common.errors import MoseError
from eval.navsim.config import V2_COLUMNS

FORMAT = "navsim-trajectories"


class NavsimPredictionsError(MoseError, ValueError):
    """A predictions file cannot be read; the message names the file, the place and what was expected."""


def read_predictions(path, interval_s: float | None = None) -> tuple[dict[str, np.ndarray], float | None]:
    """Read a predictions file -> ({token: (N, 3) float array}, interval in s if the file states one).

    Arrays are returned as given (shape and finiteness are checked per scene by the scorer, so one bad
    entry does not reject the whole file)."""
    path = Path(path)
    if not path.is_file():
        raise NavsimPredictionsError(f"{path}: no such predictions file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path), None
    if suffix in (".pkl", ".pickle"):
        return _read_pickle(path)
    raise NavsimPredictionsError(f"{path}: unknown predictions format {suffix!r}; expected .json, .csv or .pkl (NAVSIM submission)")


def _as_poses(value, where: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise NavsimPredictionsError(f"{where}: expected a list of [x, y, heading] poses, got {str(value)[:80]}") from None


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NavsimPredictionsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise NavsimPredictionsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    interval = None
    if "trajectories" in data:
        if data.get("format", FORMAT) != FORMAT:
            raise NavsimPredictionsError(f"{path}: field 'format': expected {FORMAT!r}, got {data.get('format')!r}")
        if data.get("frame", "ego_rear_axle") != "ego_rear_axle":
            raise NavsimPredictionsError(f"{path}: field 'frame': expected 'ego_rear_axle', got {data.get('frame')!r}")
        interval = data.get("interval_s")
        if interval is not None and not (isinstance(interval, (int, float)) and interval > 0):
            raise NavsimPredictionsError(f"{path}: field 'interval_s': expected a positive number of seconds, got {interval!r}")
        data = data["trajectories"]
        if not isinstance(data, dict):
            raise NavsimPredictionsError(f"{path}: field 'trajectories': expected an object token -> poses")
    return {str(k): _as_poses(v, f"{path}: trajectories[{k!r}]") for k, v in data.items()}, (float(interval) if interval else None)


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    need = ("token", "pose", "x", "y", "heading")
    rows: dict[str, list] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise NavsimPredictionsError(f"{path}: missing column(s) {missing}; expected header {','.join(need)}")
        for line, r in enumerate(reader, start=2):
            try:
                rows.setdefault(r["token"], []).append((int(r["pose"]), float(r["x"]), float(r["y"]), float(r["heading"])))
            except (TypeError, ValueError):
                raise NavsimPredictionsError(f"{path}: line {line}: expected an integer pose and numbers x, y, heading, got {dict(r)}") from None
    out = {}
    for tok, poses in rows.items():
        idx = [p[0] for p in poses]
        if sorted(idx) != list(range(len(idx))):
            raise NavsimPredictionsError(f"{path}: token {tok!r}: pose indices must be 0..{len(idx) - 1} without gaps or repeats, got {sorted(idx)}")
        out[tok] = np.array([p[1:] for p in sorted(poses)], dtype=np.float64)
    return out


class _Record:
    """Plain attribute bag standing in for NAVSIM / nuPlan dataclasses inside a submission pickle."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state or {})


class _Trajectory(_Record):
    pass


class _Sampling(_Record):
    pass


_ALLOWED = {
    ("navsim.common.dataclasses", "Trajectory"): _Trajectory,
    ("nuplan.planning.simulation.trajectory.trajectory_sampling", "TrajectorySampling"): _Sampling,
    ("copyreg", "_reconstructor"): None,
    ("builtins", "object"): object,
}
_NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
          ("numpy.core.numeric", "_frombuffer")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        key = (module, name)
        if key in _NUMPY:
            return super().find_class(module, name)
        if key == ("copyreg", "_reconstructor"):
            import copyreg

            return copyreg._reconstructor
        if key in _ALLOWED:
            return _ALLOWED[key]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a NAVSIM submission holds only numpy arrays and Trajectory objects")


def _read_pickle(path: Path):
    try:
        data = _SafeUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise NavsimPredictionsError(f"{path}: not a readable NAVSIM submission pickle ({exc})") from None
    if not isinstance(data, dict) or "predictions" not in data:
        raise NavsimPredictionsError(f"{path}: expected a dict with a 'predictions' entry (NAVSIM submission), got {type(data).__name__}")
    preds = data["predictions"]
    if isinstance(preds, dict):
        preds = [preds]
    out, interval = {}, None
    for i, part in enumerate(preds):
        if not isinstance(part, dict):
            raise NavsimPredictionsError(f"{path}: predictions[{i}]: expected a dict token -> Trajectory")
        for tok, traj in part.items():
            poses = getattr(traj, "poses", traj)
            out[str(tok)] = _as_poses(poses, f"{path}: predictions[{i}][{tok!r}]")
            sampling = getattr(traj, "trajectory_sampling", None)
            step = getattr(sampling, "interval_length", None)
            if step is not None:
                if interval is not None and abs(step - interval) > 1e-9:
                    raise NavsimPredictionsError(f"{path}: trajectories use different intervals ({interval} and {step} s)")
                interval = float(step)
    return out, interval


# ----------------------------------------------------------------------------------------------
# writing


def write_predictions(path, trajectories: Mapping[str, np.ndarray], interval_s: float = 0.5) -> Path:
    """Write trajectories in the JSON (or, for a .csv path, CSV) form above, atomically."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["token", "pose", "x", "y", "heading"])
            for tok, poses in trajectories.items():
                for i, (x, y, h) in enumerate(np.asarray(poses, float)):
                    w.writerow([tok, i, repr(float(x)), repr(float(y)), repr(float(h))])
        return path
    write_json(path, {"format": FORMAT, "version": 1, "frame": "ego_rear_axle", "interval_s": float(interval_s),
                      "trajectories": {k: np.asarray(v, float).tolist() for k, v in trajectories.items()}}, indent=None)
    return path


def write_scores_csv(path, rows: Sequence[dict], average: dict) -> Path:
    """The official v2 columns (token, valid, sub-metrics, score), then ours; last row = `average`."""
    cols = ["token", "valid", *V2_COLUMNS, "score"]
    extra = ["comfort"] if any("comfort" in r for r in rows) else []
    extra += ["tracking", "metric", "reason", "human_filter_lifted", "score_valid_only", "invalid_rows"]  # the last two: average row only

    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else repr(v)
        return v

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols + extra)
        for r in list(rows) + [average]:
            w.writerow([fmt(r.get(c, "")) for c in cols + extra])
    return Path(path)
