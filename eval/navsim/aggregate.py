"""From sub-metrics to a score: EP normalisation, the PDMS (v1) / EPDMS (v2) formulas, the human filter."""
from __future__ import annotations

import math

import numpy as np

from eval.navsim.config import MULTIPLICATIVE_V1, MULTIPLICATIVE_V2, WEIGHTS_V1, WEIGHTS_V2


def multiplicative_product(sub: dict, version: str) -> np.ndarray:
    keys = MULTIPLICATIVE_V2 if version == "v2" else MULTIPLICATIVE_V1
    return np.prod([np.asarray(sub[k], float) for k in keys], axis=0)


def normalise_progress(raw: np.ndarray, multiplier: np.ndarray, threshold: float, version: str = "v2") -> np.ndarray:
    """EP for runs scored together (the agent and PDM-Closed; or PDM-Closed's own proposals).

    v2 (EPDMS), as the devkit since v2.1 (navsim navsim/planning/simulation/planner/pdm_planner/scoring/
    pdm_scorer.py:229-238, `_aggregate_pdm_scores`): normaliser = max over runs of raw progress x that run's
    multiplicative product; if it is > threshold (5 m), EP = clip(raw / normaliser, 0, 1), else every run gets 1.
    The run's own product does not enter its numerator, so an NC = 0.5 run that drove as far as the best run
    still gets EP 1, and a run scored alone always gets 1.

    v1 (PDMS), as v1.1 (same file at tag v1.1, lines 165-173, `_aggregate_scores`): EP = raw x product / the
    largest such value; below the threshold 1, and 0 where the product is 0.
    """
    raw = np.asarray(raw, float)
    masked = raw * np.asarray(multiplier, float)
    top = float(np.max(masked)) if len(raw) else 0.0
    if version == "v1":
        if top > threshold:
            return masked / top
        return np.where(np.asarray(multiplier) == 0.0, 0.0, 1.0)
    if top > threshold:
        return np.clip(raw / top, 0.0, 1.0)
    return np.ones(len(raw))


def score_row(row: dict, version: str) -> float:
    """Score of one scene's sub-metric dict. v2: NC·DAC·DDC·TLC·(5 EP + 5 TTC + 2 LK + 2 HC + 2 EC)/16, with EC
    and its weight dropped when EC is NaN (unavailable). v1: NC·DAC·(5 TTC + 5 EP + 2 C)/12."""
    mult_keys, weights = (MULTIPLICATIVE_V2, WEIGHTS_V2) if version == "v2" else (MULTIPLICATIVE_V1, WEIGHTS_V1)
    prod = 1.0
    for k in mult_keys:
        prod *= float(row[k])
    num = den = 0.0
    for k, w in weights.items():
        v = row.get(k, math.nan)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            if k == "two_frame_extended_comfort":
                continue
            raise ValueError(f"sub-metric {k!r} is missing; cannot compute the {version} score")
        num += w * float(v)
        den += w
    return prod * num / den


def apply_human_filter(agent: dict, human: dict, columns) -> tuple[dict, list[str]]:
    """Human filter (v2, after the 2025-09-29 fix): every sub-metric the logged human scores exactly 0 on is
    set to 1 for the agent. Returns the new sub-metric dict and the names of the columns that were lifted;
    the caller recomputes the score from the new dict."""
    out, lifted = dict(agent), []
    for k in columns:
        h = human.get(k)
        if h is not None and not (isinstance(h, float) and math.isnan(h)) and float(h) == 0.0:
            if float(out[k]) != 1.0:
                lifted.append(k)
            out[k] = 1.0
    return out, lifted
