"""The common selector interface: `Selector`, its result `Selection` (a manifest on disk) and `PilotTrainer`.

A manifest is two files written atomically (common/atomic.py)::

    OUT.jsonl          # one row per selected scene, in selection order: rank, id, score, reason (+ extras)
    OUT.header.json    # method, budget, seed, config, fitted state, fallbacks, and the rows file's sha256

The rows file is written first and the header last; the header names the rows file's checksum and row
count, so `Selection.read` refuses a rows file that does not belong to its header (e.g. a crash between
the two renames, or an edited file).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

from common.atomic import write_json, write_jsonl
from curation.errors import PilotError, SelectionError  # noqa: F401  (re-exported: the selector API's errors)

if TYPE_CHECKING:
    from curation.context import SelectionContext

FORMAT = "mose.selection"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# model feedback


@runtime_checkable
class PilotTrainer(Protocol):
    """Trains a (light or real) model from scratch on `ids` and scores it on its own held-out set.

    `fit_and_score` returns a dict of metrics that must hold "score" (higher is better, e.g. mean EPDMS).
    """

    def fit_and_score(self, ids: Sequence[str]) -> dict[str, float]: ...


@runtime_checkable
class SampleScorer(Protocol):
    """Optional: per-sample scores of the model last fitted by `fit_and_score` (MOSAIC's importance I(x))."""

    def score_samples(self, ids: Sequence[str]) -> np.ndarray: ...


def run_pilot(pilot: PilotTrainer, ids: Sequence[str], what: str = "pilot run") -> dict[str, float]:
    """Call `pilot.fit_and_score(ids)`; raise `PilotError` naming the run on failure or a non-finite score."""
    try:
        metrics = pilot.fit_and_score(list(ids))
    except Exception as exc:  # noqa: BLE001 - any pilot failure becomes one clear error
        raise PilotError(f"{what} on {len(ids)} scenes failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(metrics, dict) or "score" not in metrics:
        raise PilotError(f"{what} on {len(ids)} scenes: expected a dict with a 'score' entry, got {metrics!r}")
    score = metrics["score"]
    if not isinstance(score, (int, float, np.floating)) or not math.isfinite(float(score)):
        raise PilotError(f"{what} on {len(ids)} scenes: expected a finite 'score', got {score!r}")
    return {k: float(v) if isinstance(v, (int, float, np.floating)) else v for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------
# the result


@dataclass
class Selection:
    """Ordered selected ids with a score and a reason each, plus what the method fitted to choose them.

    `state` holds the method's fitted state (e.g. MOSAIC's a_i, tau_i, allocation, fit quality); `fallbacks`
    lists every documented fallback taken (a dict each: what, why, and the consequence); `extra` holds
    optional per-row columns (e.g. "domain", "round") of the same length as `ids`.
    """

    ids: list[str]
    scores: list[float]
    reasons: list[str]
    method: str
    budget: int
    seed: int | None = None
    config: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)
    extra: dict[str, list] = field(default_factory=dict)
    pool: dict = field(default_factory=dict)  # where the ids come from: path, size

    def __post_init__(self):
        n = len(self.ids)
        if len(self.scores) != n or len(self.reasons) != n:
            raise SelectionError(f"Selection({self.method}): ids, scores and reasons must have equal lengths, got {n}, {len(self.scores)}, {len(self.reasons)}")
        for k, v in self.extra.items():
            if len(v) != n:
                raise SelectionError(f"Selection({self.method}): extra column {k!r} has {len(v)} values for {n} ids")
        if len(set(self.ids)) != n:
            dup = [i for i in self.ids if self.ids.count(i) > 1][:5]
            raise SelectionError(f"Selection({self.method}): ids must be unique, got duplicates {dup}")

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> list[dict]:
        out = []
        for r, (i, s, why) in enumerate(zip(self.ids, self.scores, self.reasons)):
            row = {"rank": r, "id": i, "score": _finite_or_none(s), "reason": why}
            for k, v in self.extra.items():
                row[k] = v[r]
            out.append(row)
        return out

    # I/O ------------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike) -> Path:
        """Write `path` (JSONL rows) then its header (`<stem>.header.json`), each atomically. Returns the rows path."""
        rows_path, header_path = manifest_paths(path)
        write_jsonl(rows_path, self.rows())
        header = {
            "format": FORMAT, "version": FORMAT_VERSION, "method": self.method, "budget": int(self.budget),
            "seed": self.seed, "num_selected": len(self), "rows_file": rows_path.name,
            "rows_sha256": _sha256(rows_path), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pool": self.pool, "config": self.config, "state": _jsonable(self.state),
            "fallbacks": _jsonable(self.fallbacks), "extra_columns": sorted(self.extra),
        }
        write_json(header_path, header)
        return rows_path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Selection":
        """Read a manifest from its rows file or its header file; checks that the two belong together."""
        rows_path, header_path = manifest_paths(path)
        if not header_path.is_file():
            raise FileNotFoundError(f"{header_path}: selection header missing (expected next to {rows_path})")
        header = json.loads(header_path.read_text())
        if header.get("format") != FORMAT:
            raise SelectionError(f"{header_path}: field 'format': expected {FORMAT!r}, got {header.get('format')!r}")
        if header.get("version") != FORMAT_VERSION:
            raise SelectionError(f"{header_path}: field 'version': expected {FORMAT_VERSION}, got {header.get('version')!r}")
        if not rows_path.is_file():
            raise FileNotFoundError(f"{rows_path}: selection rows missing (named by {header_path})")
        if _sha256(rows_path) != header["rows_sha256"]:
            raise SelectionError(f"{rows_path}: checksum does not match field 'rows_sha256' of {header_path}; the rows file was changed or belongs to another run")
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
        if len(rows) != header["num_selected"]:
            raise SelectionError(f"{rows_path}: expected {header['num_selected']} rows (field 'num_selected' of the header), got {len(rows)}")
        for r, row in enumerate(rows):
            if row.get("rank") != r:
                raise SelectionError(f"{rows_path} line {r + 1}: field 'rank': expected {r}, got {row.get('rank')!r}")
        extra = {k: [row.get(k) for row in rows] for k in header.get("extra_columns", [])}
        return cls(
            ids=[row["id"] for row in rows],
            scores=[float("nan") if row["score"] is None else float(row["score"]) for row in rows],
            reasons=[row["reason"] for row in rows], method=header["method"], budget=header["budget"],
            seed=header.get("seed"), config=header.get("config", {}), state=header.get("state", {}),
            fallbacks=header.get("fallbacks", []), extra=extra, pool=header.get("pool", {}),
        )


def manifest_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(rows path, header path) for a manifest named by either file."""
    path = Path(path)
    if path.name.endswith(".header.json"):
        stem = path.name[: -len(".header.json")]
        return path.with_name(stem + ".jsonl"), path
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path, path.with_name(stem + ".header.json")


# ----------------------------------------------------------------------------------------------
# the interface


class Selector:
    """Base class: parameters in `__init__`, `select(pool, budget, ...)` returns a `Selection`.

    `pool` is a `datasets_cfg.schema.ScenePool` or any object with `.ids` and `.column(name)` (e.g.
    `curation.features.ArrayPool` for feature tables too large to hold as scenes).

    A subclass declares the inputs it uses in `needs` (names of `curation.context.SelectionContext` fields)
    and implements `_select(pool, budget, ctx)`; `select` builds the context with
    `curation.context.selection_context`, which raises `SelectionError` for an input the method does not use.
    """

    method: str = "base"
    needs: frozenset = frozenset()

    def select(self, pool, budget: int, context: SelectionContext | None = None, **inputs) -> Selection:
        """Select `budget` scenes of `pool`; the inputs come as a `SelectionContext` (`context`) and/or keywords."""
        from curation.context import selection_context

        return self._select(pool, budget, selection_context(self.method, self.needs, context, **inputs))

    def _select(self, pool, budget: int, ctx: SelectionContext) -> Selection:  # pragma: no cover - interface
        raise NotImplementedError

    def get_params(self) -> dict:
        """Constructor parameters (JSON-friendly), recorded in the manifest's `config`."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: _jsonable(getattr(self, n)) for n in names if hasattr(self, n)}


def check_budget(budget: int, pool_size: int, what: str = "pool") -> int:
    """Validate a budget against the number of candidates; raise `SelectionError` with both numbers."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise SelectionError(f"budget: expected an integer number of scenes, got {budget!r}")
    if budget <= 0:
        raise SelectionError(f"budget: expected a positive number of scenes, got {budget}")
    if budget > pool_size:
        raise SelectionError(f"budget: {budget} scenes requested but the {what} has only {pool_size}; lower --budget or add scenes")
    return int(budget)


def pool_info(pool) -> dict:
    root = getattr(pool, "root", None)
    return {"path": str(root) if root is not None else None, "size": len(pool)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _finite_or_none(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(obj: Any):
    """Plain JSON types (numpy arrays/scalars to lists/numbers, non-finite floats to None)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
