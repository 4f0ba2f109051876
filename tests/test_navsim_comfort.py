"""Comfort bounds just inside / just outside, history prepending, the centre shift, and EC thresholds.

Signals are chosen so the Savitzky-Golay filters reproduce them exactly (constants, lines and parabolas are
fitted without error by polyorder-2/3 filters), so the filtered value is the value we put in; the spike test
computes the filtered peak independently with scipy.signal.savgol_filter.
"""
import numpy as np
import pytest
from scipy.signal import savgol_filter

from eval.navsim import comfort
from eval.navsim.config import AX, AY, HEADING, STATE_SIZE, VX, YAW_ACCEL, YAW_RATE, ComfortParams, VehicleParams

CP, VEH, DT = ComfortParams(), VehicleParams(), 0.1
CHECKS = ["lon_accel", "lat_accel", "jerk", "lon_jerk", "yaw_accel", "yaw_rate"]
T = np.arange(41) * DT


def states(ax=0.0, ay=0.0, heading=0.0, yaw_rate=0.0, yaw_accel=0.0, n=41):
    s = np.zeros((1, n, STATE_SIZE))
    s[0, :, VX] = 10.0
    for idx, v in ((AX, ax), (AY, ay), (HEADING, heading), (YAW_RATE, yaw_rate), (YAW_ACCEL, yaw_accel)):
        s[0, :, idx] = v
    return s


def check(s, name, v1=False):
    res = comfort.comfort_checks_v1(s, DT, CP) if v1 else comfort.comfort_checks_v2(s, DT, VEH, CP)
    return bool(res[0, CHECKS.index(name)])


@pytest.mark.parametrize("name,make,bound", [
    ("lon_accel", lambda v: states(ax=v), 2.40),
    ("lon_accel", lambda v: states(ax=-v), 4.05),
    ("lat_accel", lambda v: states(ay=v), 4.89),
    ("lat_accel", lambda v: states(ay=-v), 4.89),
    ("yaw_rate", lambda v: states(heading=v * T), 0.95),
    ("yaw_accel", lambda v: states(heading=0.5 * v * T**2), 1.93),
])
@pytest.mark.parametrize("v1", [False, True])
def test_each_bound_just_inside_and_outside(name, make, bound, v1):
    assert check(make(bound - 0.01), name, v1)
    assert not check(make(bound + 0.01), name, v1)
    assert not check(make(bound), name, v1)  # bounds are strict


def _jerk_reference(accel, v1):
    """Largest |jerk| as the spec defines it, computed with scipy directly: accel smoothed (window 8,
    polyorder 2), then its derivative (window 15 in v2, the whole horizon in v1, polyorder 2)."""
    smooth = savgol_filter(accel, window_length=8, polyorder=2)
    return np.abs(savgol_filter(smooth, window_length=41 if v1 else 15, polyorder=2, deriv=1, delta=DT)).max()


@pytest.mark.parametrize("name,profile,bound", [
    ("jerk", lambda: 0.5 + T, 8.37),  # |accel| = 0.5 + v t (ax only)
    ("lon_jerk", lambda: -(T - 2.0), 4.13),
])
@pytest.mark.parametrize("v1", [False, True])
def test_jerk_bounds_just_inside_and_outside(name, profile, bound, v1):
    base = profile()
    unit = _jerk_reference(np.abs(base) if name == "jerk" else base, v1)  # jerk per unit slope (edges included)
    for margin, ok in ((-0.01, True), (0.01, False)):
        k = (bound + margin) / unit
        ax = 0.5 + k * T if name == "jerk" else k * base
        assert check(states(ax=ax), name, v1) == ok


def test_acceleration_spike_against_scipy_reference():
    bump = np.exp(-0.5 * ((T - 2.0) / 0.15) ** 2)  # a short spike at t = 2 s
    peak_per_unit = savgol_filter(bump, window_length=8, polyorder=2).max()  # independent reference
    inside = states(ax=(2.40 - 0.01) / peak_per_unit * bump)
    outside = states(ax=(2.40 + 0.01) / peak_per_unit * bump)
    assert (2.40 - 0.01) / peak_per_unit > 2.40  # the raw spike exceeds the bound; only the filtered value is inside
    assert check(inside, "lon_accel") and not check(outside, "lon_accel")


def test_v2_moves_longitudinal_accel_to_the_box_centre():
    # 2.0 m/s^2 at the rear axle while turning at 0.6 rad/s: 2.0 + 1.461 * 0.36 = 2.53 at the centre
    s = states(ax=2.0, heading=0.6 * T, yaw_rate=0.6)
    assert not check(s, "lon_accel") and check(s, "lon_accel", v1=True)
    assert comfort.center_accel_x(s, VEH)[0, 0] == pytest.approx(2.0 + 1.461 * 0.36)


def test_history_comfort_prepends_the_logged_past():
    sim = states(ax=0.5)
    calm = states(ax=0.3, n=14)[0]
    harsh = states(ax=-5.0, n=14)[0]  # a logged hard brake in the past 1.5 s
    assert comfort.history_comfort(sim, calm, DT, VEH, CP)[0] == 1.0
    assert comfort.history_comfort(sim, harsh, DT, VEH, CP)[0] == 0.0
    assert comfort.history_comfort(sim, np.zeros((0, STATE_SIZE)), DT, VEH, CP)[0] == 1.0


@pytest.mark.parametrize("delta,ok", [(0.6, True), (0.8, False)])
def test_two_frame_accel_threshold(delta, ok):
    cur = states(ax=1.0)
    prev = states(ax=1.0 + delta)  # a constant difference: RMS = delta (threshold 0.7)
    assert comfort.two_frame_extended_comfort(cur, prev, 5, DT, CP)[0] == (1.0 if ok else 0.0)


@pytest.mark.parametrize("delta,ok", [(0.08, True), (0.12, False)])
def test_two_frame_yaw_rate_threshold(delta, ok):
    cur = states(heading=0.2 * T)
    prev = states(heading=(0.2 + delta) * T)  # yaw rates differ by delta (threshold 0.1)
    assert comfort.two_frame_extended_comfort(cur, prev, 5, DT, CP)[0] == (1.0 if ok else 0.0)


def test_two_frame_uses_the_overlap():
    # previous frame = the current one shifted by 5 steps: identical over the overlap -> comfortable,
    # even though the non-overlapping ends differ wildly
    base = np.concatenate([np.full(5, 3.0), np.linspace(0.0, 1.0, 36), np.full(5, -3.0)])
    prev, cur = states(ax=base[:41]), states(ax=base[5:])
    assert comfort.two_frame_extended_comfort(cur, prev, 5, DT, CP)[0] == 1.0


def test_linear_operator_equals_scipy():
    y = np.random.default_rng(0).normal(size=(3, 55))
    for w, p, d in ((8, 2, 0), (15, 2, 1), (5, 3, 2), (55, 2, 0)):
        np.testing.assert_allclose(comfort._sg(y, w, p, d, DT), savgol_filter(y, w, p, deriv=d, delta=DT, axis=-1), atol=1e-9)
