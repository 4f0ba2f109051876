"""The simulation step: interpolation to 0.1 s, the LQR reference fit against the devkit's least-squares
formulation (written out here with pinv, as upstream), and tracking behaviour."""
import numpy as np
import pytest

from common.geometry import wrap_angle
from eval.navsim.config import HEADING, STATE_SIZE, VX, X, Y
from eval.navsim.simulate import initial_state, interpolate_poses, reference_profiles, simulate, track


def devkit_profiles(poses, dt, jerk_penalty, curvature_rate_penalty):
    """Transcription of the devkit's batch_lqr_utils least squares (dense matrices, pinv)."""
    d = np.diff(poses, axis=1)
    dxy, dh = d[..., :2], wrap_angle(d[..., 2])
    B, M = dh.shape
    h = poses[:, :-1, 2]
    y = dxy.reshape(B, -1)
    col = np.zeros_like(y)
    col[:, 0::2], col[:, 1::2] = np.cos(h), np.sin(h)
    A = np.repeat(col[..., None] * dt**2, M, axis=2)
    A[..., 0] = col * dt
    A[:, np.repeat(np.triu(np.ones((M, M), bool), k=1), 2, axis=0)] = 0.0
    # the devkit's jerk regulariser (navsim .../simulation/batch_lqr_utils.py:59-70): two band ASSIGNMENTS, the
    # second overwriting the first's +1 entries except the last one -> -I with one +1 (see the literal below)
    band = devkit_band(M - 2)
    R = np.hstack([np.zeros((M - 2, 1)), band])
    At = A.transpose(0, 2, 1)
    x = np.einsum("bij,bj->bi", np.linalg.pinv(At @ A + jerk_penalty * R.T @ R) @ At, y)
    v = x[:, :1] + np.concatenate([np.zeros((B, 1)), np.cumsum(x[:, 1:] * dt, 1)], 1)
    C = np.tril(np.ones((M, M)))[None].repeat(B, 0)
    C[:, :, 0] = v * dt
    C[:, 1:, 1:] *= (v[:, 1:] * dt**2)[:, :, None]
    Q = curvature_rate_penalty * np.eye(M)
    Q[0, 0] = 1e-10
    Ct = C.transpose(0, 2, 1)
    z = np.einsum("bij,bj->bi", np.linalg.pinv(Ct @ C + Q) @ Ct, dh)
    kappa = z[:, :1] + np.concatenate([np.zeros((B, 1)), np.cumsum(z[:, 1:] * dt, 1)], 1)
    return v, kappa


def devkit_band(n):
    """The matrix `_make_banded_difference_matrix(n)` returns (navsim batch_lqr_utils.py:66-70): zeros (n, n+1),
    then [:, 1:] = I, then [:, :-1] = -I (assignment): -1 on the diagonal, 0 above it, except +1 at (n-1, n)."""
    out = -np.eye(n, n + 1)
    out[n - 1, n] = 1.0
    return out


def test_devkit_band_matrix_literal():
    # worked by hand from the three assignments for n = 3
    np.testing.assert_array_equal(devkit_band(3), [[-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 1]])


def random_paths(n, rng, T=41, dt=0.1):
    t = np.arange(T) * dt
    v0, acc, k = rng.uniform(0, 15, n), rng.uniform(-3, 2, n), rng.uniform(-0.1, 0.1, n)
    s = np.maximum.accumulate(np.maximum(v0[:, None] * t + 0.5 * acc[:, None] * t**2, 0), axis=1)
    h = k[:, None] * s + rng.normal(0, 0.002, (n, T))
    ds = np.diff(s, axis=1)
    x = np.concatenate([np.zeros((n, 1)), np.cumsum(ds * np.cos(h[:, :-1]), 1)], 1)
    y = np.concatenate([np.zeros((n, 1)), np.cumsum(ds * np.sin(h[:, :-1]), 1)], 1)
    return np.stack([x, y, h], -1)


def test_reference_fit_matches_devkit_least_squares():
    poses = random_paths(40, np.random.default_rng(0))
    v, k = reference_profiles(poses, 0.1, 1e-4, 1e-2)
    v_ref, k_ref = devkit_profiles(poses, 0.1, 1e-4, 1e-2)
    np.testing.assert_allclose(v, v_ref, atol=1e-8)
    np.testing.assert_allclose(k, k_ref, atol=1e-8)


def test_interpolation_prepends_now_and_holds_the_last_pose():
    poses = np.array([[[5.0, 0.0, 0.0], [10.0, 1.0, np.pi - 0.1], [20.0, 1.0, -np.pi + 0.1]]])
    out = interpolate_poses(poses, 0.5, num_steps=20)
    assert out.shape == (1, 21, 3)
    np.testing.assert_allclose(out[0, 0], 0.0)
    np.testing.assert_allclose(out[0, 5], [5.0, 0.0, 0.0])
    np.testing.assert_allclose(out[0, 2, :2], [2.0, 0.0])
    # heading takes the short way across +-pi between 1.0 s and 1.5 s
    assert abs(wrap_angle(out[0, 12, 2] - np.pi)) < 0.05
    np.testing.assert_allclose(out[0, 15:], np.repeat(poses[:, -1:], 6, 1)[0])  # held after 1.5 s


def _line(v, T=41, dt=0.1, k=0.0):
    s = v * np.arange(T) * dt
    h = k * s
    if k == 0:
        return np.stack([s, 0 * s, 0 * s], -1)
    return np.stack([np.sin(h) / k, (1 - np.cos(h)) / k, h], -1)


def test_tracking_a_straight_constant_speed_reference_is_exact():
    ref = _line(10.0)[None]
    st = track(ref, initial_state(np.zeros(3), 10.0, 0.0, 0.0, 0.0)[None])
    assert np.abs(st[0, :, :2] - ref[0, :, :2]).max() < 1e-6
    np.testing.assert_allclose(st[0, :, VX], 10.0, atol=1e-6)


def test_tracking_a_curve_stays_close_and_turns():
    # the official start state has steering 0 even in a curve (navsim_scenario_utils.py:34-46), so the tracker
    # needs a steering transient first: the path drifts outwards by well under a metre, then converges
    k = 0.02  # 50 m radius at 10 m/s
    ref = _line(10.0, k=k)[None]
    st = track(ref, initial_state(np.zeros(3), 10.0, 0.0, 10.0 * 10.0 * k, 10.0 * k)[None])
    err = np.hypot(*(st[0, :, :2] - ref[0, :, :2]).T)
    assert err.max() < 1.0 and err[-1] < err.max()
    assert abs(wrap_angle(st[0, -1, HEADING] - ref[0, -1, 2])) < 0.05


def test_stopped_ego_with_stopped_reference_stays_put():
    ref = np.zeros((1, 41, 3))
    st = track(ref, initial_state(np.zeros(3), 0.0, 0.0, 0.0, 0.0)[None])
    assert np.abs(st[0, :, [X, Y, VX]]).max() < 1e-9


def test_as_given_keeps_the_poses_exactly():
    ref = _line(8.0, k=0.03)[None]
    init = initial_state(np.zeros(3), 8.0, 0.0, 0.0, 0.24)[None]
    given = simulate(ref, init, tracking=False)
    np.testing.assert_allclose(given[0, :, :3], ref[0], atol=1e-12)
    np.testing.assert_allclose(given[0, 5:-5, VX], 8.0, rtol=1e-3)  # finite-difference speed along the arc
    tracked = simulate(ref, init, tracking=True)
    assert given.shape == tracked.shape == (1, 41, STATE_SIZE)
    assert not np.allclose(tracked[0, :, :2], ref[0, :, :2], atol=1e-6)  # the controller is really in the loop


def test_batches_are_independent():
    rng = np.random.default_rng(1)
    refs = random_paths(6, rng)
    inits = np.stack([initial_state(np.zeros(3), float(np.hypot(*(r[1, :2] - r[0, :2])) / 0.1), 0.0, 0.0, 0.0) for r in refs])
    together = track(refs, inits)
    alone = np.stack([track(refs[i:i + 1], inits[i:i + 1])[0] for i in range(len(refs))])
    np.testing.assert_allclose(together, alone, atol=1e-10)


@pytest.mark.parametrize("speed", [0.1, 5.0])
def test_initial_state_is_the_devkits(speed):
    # navsim_scenario_utils.py:34-46: EgoState.build_from_rear_axle(pose, tire_steering_angle=0, velocity (vx, vy),
    # acceleration (ax, ay)); its angular velocity / acceleration are 0 (pdm_array_representation.py:73-91 reads
    # them into the state array). The logged yaw rate (0.2) must not leak in.
    s = initial_state(np.array([1.0, 2.0, 0.3]), speed, 0.5, -0.25, 0.2, speed_lat=0.03)
    np.testing.assert_array_equal(s, [1.0, 2.0, 0.3, speed, 0.03, 0.5, -0.25, 0.0, 0.0, 0.0, 0.0])
