"""Comfort: v1 "C", v2 history comfort (HC) and two-frame extended comfort (EC).

Derivatives are Savitzky-Golay filters (scipy.signal.savgol_filter, default "interp" mode) along time,
batched over the leading axis; values are rounded to 8 decimals before the strict bound checks, as in
the devkit's pdm_comfort_metrics.py. The window lengths differ between versions and are part of the
definition:

- v2 (HC, EC): accel window 8 / polyorder 2 (x, y at the box centre for HC); jerk = derivative (window 15,
  polyorder 2) of that smoothed accel; yaw rate window 5 / polyorder 2; yaw accel window 5 / polyorder 3
  (EC's yaw accel uses polyorder 2, as upstream).
- v1 (C): the devkit passes the whole horizon as window for longitudinal/lateral accel and for the jerk
  derivative (rear-axle values); yaw as in v2.

Even windows (8) need a recent SciPy (checked with 1.17). Each filter is applied as a cached (T, T) linear
operator built from scipy's own savgol_filter, so batches cost one matrix product.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.signal import savgol_filter

from eval.navsim.config import AX, AY, HEADING, YAW_ACCEL, YAW_RATE, ComfortParams, VehicleParams


@lru_cache(maxsize=64)
def _sg_operator(n: int, window: int, poly: int, deriv: int, dt: float) -> np.ndarray:
    # savgol_filter is linear in its input: filtering the identity gives the (n, n) operator, so a batch is
    # one matrix product and the result equals scipy's (edges included, "interp" mode) up to rounding.
    return savgol_filter(np.eye(n), window_length=window, polyorder=poly, deriv=deriv, delta=dt, axis=-1)


def _sg(y: np.ndarray, window: int, poly: int, deriv: int = 0, dt: float = 1.0) -> np.ndarray:
    n = y.shape[-1]
    window = min(window, n)
    if window <= poly:
        raise ValueError(f"comfort needs more than {poly} states for a polyorder-{poly} Savitzky-Golay filter, got {n}")
    return np.einsum("...n,nm->...m", y, _sg_operator(n, window, poly, deriv, float(dt)))  # batch-invariant, unlike BLAS


def _phase_unwrap(h: np.ndarray) -> np.ndarray:
    adj = np.zeros_like(h)
    adj[..., 1:] = np.cumsum(np.round(np.diff(h, axis=-1) / (2 * np.pi)), axis=-1)
    return h - 2 * np.pi * adj


def _r(x: np.ndarray) -> np.ndarray:
    return np.round(x, 8)


def _within(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return ((x > lo) & (x < hi)).all(axis=-1)


def _yaw(states: np.ndarray, dt: float, accel_poly: int = 3) -> tuple[np.ndarray, np.ndarray]:
    h = _phase_unwrap(states[..., HEADING])
    return _r(_sg(h, 5, 2, 1, dt)), _r(_sg(h, 5, accel_poly, 2, dt))


def center_accel_x(states: np.ndarray, vehicle: VehicleParams) -> np.ndarray:
    """Longitudinal acceleration moved from the rear axle to the box centre (nuPlan's get_acceleration_shifted:
    displacement * (yaw_rate^2 + yaw_accel) on the x component)."""
    return states[..., AX] + vehicle.rear_axle_to_center * (states[..., YAW_RATE] ** 2 + states[..., YAW_ACCEL])


def _six_checks(cp: ComfortParams, ax, ay, jerk, lon_jerk, yaw_accel, yaw_rate) -> np.ndarray:
    """(B, 6) bools: each filtered signal within its bound over the whole window."""
    return np.stack([
        _within(ax, cp.min_lon_accel, cp.max_lon_accel),
        _within(ay, -cp.max_abs_lat_accel, cp.max_abs_lat_accel),
        _within(jerk, -cp.max_abs_mag_jerk, cp.max_abs_mag_jerk),
        _within(lon_jerk, -cp.max_abs_lon_jerk, cp.max_abs_lon_jerk),
        _within(yaw_accel, -cp.max_abs_yaw_accel, cp.max_abs_yaw_accel),
        _within(yaw_rate, -cp.max_abs_yaw_rate, cp.max_abs_yaw_rate),
    ], axis=-1)


def comfort_checks_v2(states: np.ndarray, dt: float, vehicle: VehicleParams, cp: ComfortParams) -> np.ndarray:
    """(B, T, 11) -> (B, 6) bools: lon accel, lat accel, jerk, lon jerk, yaw accel, yaw rate within bounds."""
    ax = _r(_sg(center_accel_x(states, vehicle), 8, 2))
    ay = _r(_sg(states[..., AY], 8, 2))
    mag = _r(_sg(np.hypot(states[..., AX], states[..., AY]), 8, 2))
    jerk = _r(_sg(mag, 15, 2, 1, dt))
    lon_jerk = _r(_sg(ax, 15, 2, 1, dt))
    yaw_rate, yaw_accel = _yaw(states, dt)
    return _six_checks(cp, ax, ay, jerk, lon_jerk, yaw_accel, yaw_rate)


def comfort_checks_v1(states: np.ndarray, dt: float, cp: ComfortParams) -> np.ndarray:
    """As `comfort_checks_v2` with v1.1's windows and rear-axle accelerations."""
    T = states.shape[-2]
    ax = _r(_sg(states[..., AX], T, 2))
    ay = _r(_sg(states[..., AY], T, 2))
    mag = _r(_sg(np.hypot(states[..., AX], states[..., AY]), 8, 2))
    jerk = _r(_sg(mag, T, 2, 1, dt))
    lon_jerk = _r(_sg(_r(_sg(states[..., AX], 8, 2)), T, 2, 1, dt))
    yaw_rate, yaw_accel = _yaw(states, dt)
    return _six_checks(cp, ax, ay, jerk, lon_jerk, yaw_accel, yaw_rate)


def history_comfort(states: np.ndarray, history: np.ndarray, dt: float, vehicle: VehicleParams, cp: ComfortParams) -> np.ndarray:
    """HC per trajectory: the logged past (H, 11) prepended to each simulated (B, T, 11) run, all six checks."""
    if len(history):
        states = np.concatenate([np.broadcast_to(history[None], (len(states),) + history.shape), states], axis=1)
    return np.where(comfort_checks_v2(states, dt, vehicle, cp).all(-1), 1.0, 0.0)


def ec_features(states: np.ndarray, dt: float) -> dict:
    mag = _r(_sg(np.hypot(states[..., AX], states[..., AY]), 8, 2))
    h = _phase_unwrap(states[..., HEADING])
    return {
        "acceleration": mag,
        "jerk": _r(_sg(mag, 15, 2, 1, dt)),
        "yaw_rate": _r(_sg(h, 5, 2, 1, dt)),
        "yaw_accel": _r(_sg(h, 5, 2, 2, dt)),
    }


def two_frame_extended_comfort(current: np.ndarray, previous: np.ndarray, overlap_start: int, dt: float, cp: ComfortParams) -> np.ndarray:
    """EC for (B, T, 11) current runs against (B, T, 11) runs of the frame `overlap_start` steps earlier: the
    overlapping states (current[:-k] vs previous[k:]) must agree in RMS within the four thresholds."""
    k = overlap_start
    a, b = ec_features(current[:, :-k], dt), ec_features(previous[:, k:], dt)
    rms = {name: np.sqrt(np.mean((a[name] - b[name]) ** 2, axis=-1)) for name in a}
    ok = (rms["acceleration"] <= cp.ec_accel) & (rms["jerk"] <= cp.ec_jerk) & (rms["yaw_rate"] <= cp.ec_yaw_rate) & (rms["yaw_accel"] <= cp.ec_yaw_accel)
    return np.where(ok, 1.0, 0.0)
