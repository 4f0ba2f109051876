"""Per-scene scores from a file or a mapping (uncertainty, MOSAIC importance, previous model's EPDMS, ...).

Accepted files: CSV with a header (an `id` or `token` column and the score column), JSON (an object
{id: score}, or a list of rows), JSONL (one row per line). Rows are objects with "id" (or "token") and
the score column (default "score").
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from curation.selection import SelectionError

ID_KEYS = ("id", "token")


def read_scores(path: str | os.PathLike, column: str = "score") -> dict[str, float]:
    """{id: score} from a CSV / JSON / JSONL file; rows without a finite score raise `SelectionError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scores file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return {str(k): _number(v, path, str(k), column) for k, v in data.items()}
        rows = data
    else:
        raise SelectionError(f"{path}: expected a .csv, .json or .jsonl scores file, got suffix {suffix!r}")
    out: dict[str, float] = {}
    for i, row in enumerate(rows):
        key = next((k for k in ID_KEYS if k in row), None)
        if key is None:
            raise SelectionError(f"{path} row {i}: expected an 'id' or 'token' field, got fields {sorted(row)}")
        if column not in row:
            raise SelectionError(f"{path} row {i} (id={row[key]!r}): field {column!r} missing; fields: {sorted(row)}")
        if str(row[key]).lower() == "average":  # NAVSIM CSVs end with an average row
            continue
        out[str(row[key])] = _number(row[column], path, str(row[key]), column)
    return out


def align_scores(scores: Mapping[str, float] | np.ndarray | Sequence[float] | str | os.PathLike, ids: Sequence[str],
                 column: str = "score", missing: str = "error") -> tuple[np.ndarray, int]:
    """Scores in the order of `ids` from a file, a mapping or an array; returns (scores, number missing).

    `missing`: "error" (default) raises naming the first missing ids; "nan" leaves NaN for the caller's
    documented fallback.
    """
    if isinstance(scores, (str, os.PathLike)):
        scores = read_scores(scores, column)
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
