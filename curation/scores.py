"""Per-scene scores from a file or a mapping (uncertainty, MOSAIC importance, previous model's EPDMS, ...).

Accepted files: CSV with a header (an `id` or `token` column and the score column), JSON (an object
{id: score}, or a list of rows), JSONL (one row per line). Rows are objects with "id" (or "token") and
the score column (default "score").

What the scores are (the quantity). A file may name it, and each consumer says which quantities it accepts
(`align_scores(..., accept=...)`): the uncertainty selector takes `UNCERTAINTY_QUANTITIES`, MOSAIC's importance
`IMPORTANCE_QUANTITIES`; both refuse a driving score (`SCORE_QUANTITIES`: "epdms", "pdms"), whose high values
mean the *best*-driven scenes. How a file names it:

- CSV / JSONL / a JSON list of rows: a `quantity` column / field (one value for every row);
- JSON object: the header form {"quantity": "uncertainty", "scores": {id: score}};
- a NAVSIM scores CSV (written by `mose eval navsim`, eval/navsim/predictions.py `write_scores_csv`: columns
  token, valid, the sub-metrics, score, ..., metric) is recognised by its columns; its quantity is its `metric`
  column ("epdms" or "pdms"; "epdms" where that column is absent).

A file that names no quantity is taken as the consumer asks (as before quantities were named). To rank by
difficulty from a driving score, `write_difficulty(epdms_csv, out)` writes 1 - score as quantity "difficulty".
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.atomic import atomic_path
from curation.selection import SelectionError

ID_KEYS = ("id", "token")
QUANTITY_KEY = "quantity"
SCORE_QUANTITIES = frozenset({"epdms", "pdms"})  # driving scores: high = well driven
UNCERTAINTY_QUANTITIES = frozenset({"uncertainty", "entropy", "variance", "difficulty"})
IMPORTANCE_QUANTITIES = UNCERTAINTY_QUANTITIES | {"importance", "loss"}
# columns only a NAVSIM scores CSV has together (eval/navsim/config.py V2_COLUMNS; curation may not import eval)
_NAVSIM_COLUMNS = frozenset({"token", "valid", "no_at_fault_collisions", "drivable_area_compliance", "ego_progress", "score"})


def score_quantity(path: str | os.PathLike) -> str | None:
    """The quantity a scores file names (lower case), or None where it names none; see the module docstring."""
    return _read(Path(path))[1]


def _read(path: Path):
    """(rows or an {id: score} dict, quantity or None)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scores file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            cols = set(reader.fieldnames or ())
        if QUANTITY_KEY in cols:
            return rows, _one_quantity(path, rows)
        if _NAVSIM_COLUMNS <= cols:
            metrics = {str(r.get("metric") or "").strip().lower() for r in rows} - {""}
            if len(metrics) > 1:
                raise SelectionError(f"{path}: a NAVSIM scores CSV with several metrics {sorted(metrics)}")
            return rows, (metrics.pop() if metrics else "epdms")
        return rows, None
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return rows, _one_quantity(path, rows)
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            if set(data) == {QUANTITY_KEY, "scores"} and isinstance(data["scores"], dict):
                return data["scores"], str(data[QUANTITY_KEY]).strip().lower()
            return data, None
        if not isinstance(data, list):
            raise SelectionError(f"{path}: expected a JSON object or a list of rows, got {type(data).__name__}")
        return data, _one_quantity(path, data)
    raise SelectionError(f"{path}: expected a .csv, .json or .jsonl scores file, got suffix {suffix!r}")


def _one_quantity(path, rows) -> str | None:
    vals = {str(r[QUANTITY_KEY]).strip().lower() for r in rows if isinstance(r, dict) and r.get(QUANTITY_KEY) not in (None, "")}
    if len(vals) > 1:
        raise SelectionError(f"{path}: field {QUANTITY_KEY!r}: expected one quantity for the whole file, got {sorted(vals)}")
    return vals.pop() if vals else None


def check_quantity(path, quantity: str | None, accept: frozenset[str] | None, consumer: str) -> None:
    """Raise `SelectionError` where a file names a quantity `consumer` does not accept (unnamed: accepted)."""
    if accept is None or quantity is None or quantity in accept:
        return
    hint = ""
    if quantity in SCORE_QUANTITIES:
        hint = (f"; {quantity} is a driving score (high = the best-driven scenes), not {consumer}'s quantity. To rank the "
                f"worst-driven scenes first, convert it: curation.scores.write_difficulty({str(path)!r}, OUT) writes "
                f"1 - {quantity} as quantity 'difficulty'")
    raise SelectionError(f"{path}: holds {QUANTITY_KEY} {quantity!r}; {consumer} expects one of {sorted(accept)}{hint}")


def write_difficulty(path: str | os.PathLike, out: str | os.PathLike, column: str = "score") -> Path:
    """A driving-score file (EPDMS / PDMS in [0, 1]) as difficulty = 1 - score, quantity "difficulty", JSON header form."""
    scores, quantity = read_scores(path, column, with_quantity=True)
    if quantity is not None and quantity not in SCORE_QUANTITIES:
        raise SelectionError(f"{path}: holds {QUANTITY_KEY} {quantity!r}; expected a driving score {sorted(SCORE_QUANTITIES)}")
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps({QUANTITY_KEY: "difficulty", "scores": {k: 1.0 - v for k, v in scores.items()}}, indent=1))
    return Path(out)


def read_scores(path: str | os.PathLike, column: str = "score", accept: frozenset[str] | None = None,
                consumer: str = "this consumer", with_quantity: bool = False):
    """{id: score} from a CSV / JSON / JSONL file; rows without a finite score raise `SelectionError`.

    `accept`: the quantities the caller takes; a file naming another one raises (`check_quantity`).
    `with_quantity`: return ({id: score}, quantity or None).
    """
    path = Path(path)
    rows, quantity = _read(path)
    check_quantity(path, quantity, accept, consumer)
    if isinstance(rows, dict):
        out = {str(k): _number(v, path, str(k), column) for k, v in rows.items()}
        return (out, quantity) if with_quantity else out
    out: dict[str, float] = {}
    for i, row in enumerate(rows):
        key = next((k for k in ID_KEYS if k in row), None)
        if key is None:
            raise SelectionError(f"{path} row {i}: expected an 'id' or 'token' field, got fields {sorted(row)}")
        if column not in row:
            raise SelectionError(f"{path} row {i} (id={row[key]!r}): field {column!r} missing; fields: {sorted(row)}")
        if str(row[key]).lower() in ("average", "average_all_frames"):  # NAVSIM CSVs end with an average row
            continue
        out[str(row[key])] = _number(row[column], path, str(row[key]), column)
    return (out, quantity) if with_quantity else out


def align_scores(scores: Mapping[str, float] | np.ndarray | Sequence[float] | str | os.PathLike, ids: Sequence[str],
                 column: str = "score", missing: str = "error", accept: frozenset[str] | None = None,
                 consumer: str = "this consumer") -> tuple[np.ndarray, int]:
    """Scores in the order of `ids` from a file, a mapping or an array; returns (scores, number missing).

    `accept` / `consumer`: for a file, the quantities taken (see `read_scores`); a mapping or array is unchecked.

    `missing`: "error" (default) raises naming the first missing ids; "nan" leaves NaN for the caller's
    documented fallback.
    """
    if isinstance(scores, (str, os.PathLike)):
        scores = read_scores(scores, column, accept=accept, consumer=consumer)
    if isinstance(scores, Mapping):
        arr = np.array([float(scores.get(i, np.nan)) for i in ids])
    else:
        arr = np.asarray(scores, dtype=np.float64)
        if arr.shape != (len(ids),):
            raise SelectionError(f"scores: expected {len(ids)} values (one per scene), got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any() and missing == "error":
        ex = [ids[i] for i in np.flatnonzero(bad)[:5]]
        raise SelectionError(f"scores: {int(bad.sum())} of {len(ids)} scenes have no finite score, e.g. {ex}")
    return arr, int(bad.sum())


def _number(v, path, sid, column) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise SelectionError(f"{path}: id {sid!r}: field {column!r}: expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise SelectionError(f"{path}: id {sid!r}: field {column!r}: expected a finite number, got {v!r}")
    return x
