"""The official NAVSIM simulation step: interpolate a trajectory to 0.1 s and track it with an LQR
controller on a kinematic bicycle model; plus the "poses as given" alternative.

Everything is batched over a leading dimension B (proposals of one scene, or many scenes at once): the
40 simulation steps are the only Python loop. Re-derived from the devkit's BatchLQRTracker and
BatchKinematicBicycleModel (nuPlan's LQR, re-written for batches); two algebraic shortcuts keep it fast
without changing results beyond float rounding:

- the velocity least-squares fit has a heading-independent normal matrix (cos^2 + sin^2 = 1), so it is
  one constant matrix applied to the displacements projected on the headings;
- the 10-step lateral dynamics product is accumulated in closed form (the step matrices are unit upper
  triangular), instead of 10 batched 3x3 matrix products.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from common.geometry import local_to_global, wrap_angle
from eval.navsim.config import AX, AY, DEFAULT, HEADING, STATE_SIZE, STEER, STEER_RATE, VX, VY, YAW_ACCEL, YAW_RATE, Protocol, X, Y

# ----------------------------------------------------------------------------------------------
# trajectory -> poses every 0.1 s


def interpolate_poses(poses: np.ndarray, interval: float, num_steps: int = 40, dt: float = 0.1) -> np.ndarray:
    """(B, N, 3) poses at `interval`, `2*interval`, ... (t=0 pose NOT included, as in a NAVSIM trajectory) in any
    frame whose origin is the current pose -> (B, num_steps + 1, 3) poses at 0, dt, ..., num_steps*dt.

    The current pose (0, 0, 0) is prepended; x, y and the unwrapped heading are linear in time; times past
    the last pose hold it (as nuPlan's InterpolatedTrajectory clipped at its end time).
    """
    poses = np.asarray(poses, dtype=np.float64)
    B, N, _ = poses.shape
    full = np.concatenate([np.zeros((B, 1, 3)), poses], axis=1)
    full[..., 2] = np.unwrap(full[..., 2], axis=1)
    t_in = np.arange(N + 1) * interval
    t_q = np.minimum(np.arange(num_steps + 1) * dt, t_in[-1])
    i = np.clip(np.searchsorted(t_in, t_q, side="right") - 1, 0, N - 1)
    w = ((t_q - t_in[i]) / interval)[None, :, None]
    out = full[:, i] * (1.0 - w) + full[:, i + 1] * w
    out[..., 2] = wrap_angle(out[..., 2])
    return out


def trajectory_to_global(poses_local: np.ndarray, origin: np.ndarray, interval: float, num_steps: int = 40, dt: float = 0.1) -> np.ndarray:
    """(B, N, 3) ego-frame trajectories of one scene -> (B, num_steps + 1, 3) global poses every dt."""
    return local_to_global(interpolate_poses(poses_local, interval, num_steps, dt), origin)


# ----------------------------------------------------------------------------------------------
# reference profiles (velocity and curvature least squares, as nuPlan's LQR utilities)


@lru_cache(maxsize=16)
def _velocity_fit_matrix(num_disp: int, dt: float, jerk_penalty: float) -> np.ndarray:
    """K with [v0, a_0..a_{M-2}] = K @ p, p_i = displacement i projected on heading i (M = num_disp)."""
    M = num_disp
    C = np.zeros((M, M))
    C[:, 0] = dt
    C[:, 1:] = np.tril(np.ones((M, M - 1)), k=-1) * dt**2  # column j (a_{j-1}) acts on displacement i >= j
    # The jerk regulariser as the devkit builds it (navsim .../pdm_planner/simulation/batch_lqr_utils.py:59-70,
    # `_make_banded_difference_matrix`, used at :116-117): the two band assignments overwrite each other, so the
    # matrix is -I with a single +1 at the end of its last row, not a first difference. We keep that: the
    # regulariser then penalises the accelerations themselves, which is what shapes the official velocity fit.
    D = np.zeros((M - 2, M - 1))
    D[:, :-1] = -np.eye(M - 2)
    D[-1, -1] = 1.0
    R = np.hstack([np.zeros((M - 2, 1)), D])
    return np.linalg.pinv(C.T @ C + jerk_penalty * R.T @ R) @ C.T


def reference_profiles(poses: np.ndarray, dt: float, jerk_penalty: float, curvature_rate_penalty: float):
    """(B, T, 3) reference poses -> velocity (B, T-1) and curvature (B, T-1) profiles."""
    d = np.diff(poses, axis=1)
    dxy, dh = d[..., :2], wrap_angle(d[..., 2])
    h = poses[:, :-1, 2]
    proj = np.cos(h) * dxy[..., 0] + np.sin(h) * dxy[..., 1]
    M = proj.shape[1]
    # einsum, not BLAS: each row's result must not depend on how many rows share the batch
    x = np.einsum("bm,km->bk", proj, _velocity_fit_matrix(M, float(dt), float(jerk_penalty)))
    v = x[:, :1] + np.concatenate([np.zeros((len(x), 1)), np.cumsum(x[:, 1:] * dt, axis=1)], axis=1)

    # curvature: the devkit solves min ||dh - A x||^2 + x' Q x with x = (kappa_0, kappa'_0..) and
    # A[i, 0] = v_i dt, A[i, j] = v_i dt^2 (1 <= j <= i). Substituting z_i = dt * kappa_i (the curvature profile
    # itself, up to dt) makes the data term diagonal (v_i z_i - dh_i) and the penalty a first difference of z,
    # so the normal equations are tridiagonal: same minimiser, solved in O(T) per batch element.
    kappa = _solve_tridiagonal(
        v * v + _first_difference_diag(M, curvature_rate_penalty / dt**4, 1e-10 / dt**2),
        np.full(M - 1, -curvature_rate_penalty / dt**4),
        v * dh,
    ) / dt
    return v, kappa


def _first_difference_diag(n: int, weight: float, first: float) -> np.ndarray:
    """Diagonal of weight * D'D (D: first differences of n values) plus `first` on element 0."""
    d = np.full(n, 2.0 * weight)
    d[0] = d[-1] = weight
    d[0] += first
    return d


def _solve_tridiagonal(diag: np.ndarray, off: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve symmetric tridiagonal systems (Thomas algorithm, vectorised over the batch axis 0).

    diag (B, n), off (n-1,) constant off-diagonal, rhs (B, n). Stable without pivoting for the symmetric
    positive definite systems built here."""
    B, n = rhs.shape
    c = np.zeros((B, n))
    d = np.zeros((B, n))
    c[:, 0] = off[0] / diag[:, 0] if n > 1 else 0.0
    d[:, 0] = rhs[:, 0] / diag[:, 0]
    for i in range(1, n):
        den = diag[:, i] - off[i - 1] * c[:, i - 1]
        if i < n - 1:
            c[:, i] = off[i] / den
        d[:, i] = (rhs[:, i] - off[i - 1] * d[:, i - 1]) / den
    x = np.empty((B, n))
    x[:, -1] = d[:, -1]
    for i in range(n - 2, -1, -1):
        x[:, i] = d[:, i] - c[:, i] * x[:, i + 1]
    return x


# ----------------------------------------------------------------------------------------------
# LQR tracker + kinematic bicycle


def track(reference: np.ndarray, initial: np.ndarray, protocol: Protocol = DEFAULT, dt: float = 0.1) -> np.ndarray:
    """Simulate tracking (B, T+1, 3) global reference poses from (B, 11) initial states -> (B, T+1, 11) states."""
    tp, L = protocol.tracker, protocol.vehicle.wheel_base
    reference = np.asarray(reference, np.float64)
    B, T1, _ = reference.shape
    v_prof, k_prof = reference_profiles(reference, dt, tp.jerk_penalty, tp.curvature_rate_penalty)
    n_prof = v_prof.shape[1]
    N = tp.tracking_horizon
    q0, q1, q2 = tp.q_lateral
    lon_gain = -(N * dt * tp.q_longitudinal) / ((N * dt) ** 2 * tp.q_longitudinal + tp.r_longitudinal)
    steps = np.arange(N)

    states = np.zeros((B, T1, STATE_SIZE))
    states[:, 0] = initial
    for i in range(T1 - 1):
        s = states[:, i]
        ref = reference[:, i]
        dx, dy = s[:, X] - ref[:, 0], s[:, Y] - ref[:, 1]
        lat_err = -dx * np.sin(ref[:, 2]) + dy * np.cos(ref[:, 2])
        head_err = wrap_angle(s[:, HEADING] - ref[:, 2])
        v0, steer = s[:, VX], s[:, STEER]

        ref_idx = min(i + N, n_prof - 1)
        v_ref = v_prof[:, ref_idx]
        kap = k_prof[:, np.minimum(i + steps, ref_idx)]  # padded with kappa[ref_idx] past the profile end

        stop = (v_ref <= tp.stopping_velocity) & (v0 <= tp.stopping_velocity)
        accel_cmd = np.where(stop, -tp.stopping_proportional_gain * (v0 - v_ref), lon_gain * (v0 - v_ref))

        # lateral: accumulate the N-step affine dynamics e_N = A e_0 + B u + g in closed form
        vk = v0[:, None] + accel_cmd[:, None] * dt * steps[None]
        a, b, c = vk * dt, vk * dt / L, -vk * kap * dt
        A01 = np.zeros(B); A02 = np.zeros(B); A12 = np.zeros(B)  # noqa: E702
        B0 = np.zeros(B); B1 = np.zeros(B); B2 = np.zeros(B)  # noqa: E702
        g0 = np.zeros(B); g1 = np.zeros(B)  # noqa: E702
        for k in range(N):
            ak, bk = a[:, k], b[:, k]
            A02 = A02 + ak * A12
            A01 = A01 + ak
            A12 = A12 + bk
            B0 = B0 + ak * B1
            B1 = B1 + bk * B2
            B2 = B2 + dt
            g0 = g0 + ak * g1
            g1 = g1 + c[:, k]
        e0 = lat_err + A01 * head_err + A02 * steer + g0
        e1 = wrap_angle(head_err + A12 * steer + g1)
        e2 = wrap_angle(steer)
        rate_cmd = -(B0 * q0 * e0 + B1 * q1 * e1 + B2 * q2 * e2) / (B0 * B0 * q0 + B1 * B1 * q1 + B2 * B2 * q2 + tp.r_lateral)
        rate_cmd = np.where(stop, 0.0, rate_cmd)

        states[:, i + 1] = _propagate(s, accel_cmd, rate_cmd, protocol, dt)
    return states


def _propagate(s: np.ndarray, accel_cmd: np.ndarray, rate_cmd: np.ndarray, protocol: Protocol, dt: float) -> np.ndarray:
    """One Euler step of the kinematic bicycle with first-order lags on acceleration and steering."""
    tp, L = protocol.tracker, protocol.vehicle.wheel_base
    accel, steer = s[:, AX], s[:, STEER]
    new_accel = dt / (dt + tp.accel_time_constant) * (accel_cmd - accel) + accel
    ideal_steer = dt * rate_cmd + steer
    new_steer = dt / (dt + tp.steering_angle_time_constant) * (ideal_steer - steer) + steer
    steer_rate = (new_steer - steer) / dt
    v = s[:, VX]
    out = np.empty_like(s)
    out[:, X] = s[:, X] + v * np.cos(s[:, HEADING]) * dt
    out[:, Y] = s[:, Y] + v * np.sin(s[:, HEADING]) * dt
    out[:, HEADING] = wrap_angle(s[:, HEADING] + v * np.tan(steer) / L * dt)
    out[:, VX] = v + new_accel * dt
    out[:, VY] = 0.0
    out[:, STEER] = np.clip(steer + steer_rate * dt, -tp.max_steering_angle, tp.max_steering_angle)
    out[:, YAW_RATE] = out[:, VX] * np.tan(out[:, STEER]) / L
    out[:, AX] = new_accel
    out[:, AY] = 0.0
    out[:, YAW_ACCEL] = (out[:, YAW_RATE] - s[:, YAW_RATE]) / dt
    out[:, STEER_RATE] = steer_rate
    return out


# ----------------------------------------------------------------------------------------------
# "as given": states straight from the poses


def states_from_poses(poses: np.ndarray, initial: np.ndarray, dt: float = 0.1) -> np.ndarray:
    """(B, T+1, 3) poses -> (B, T+1, 11) states without a controller: speeds, accelerations and yaw rates are
    finite differences (numpy.gradient) of the poses; the t=0 state keeps the logged dynamics of `initial`."""
    poses = np.asarray(poses, np.float64)
    B, T1, _ = poses.shape
    h = np.unwrap(poses[..., 2], axis=1)
    vx_g = np.gradient(poses[..., 0], dt, axis=1)
    vy_g = np.gradient(poses[..., 1], dt, axis=1)
    v = vx_g * np.cos(h) + vy_g * np.sin(h)  # signed speed along the heading
    v[:, 0] = initial[:, VX]
    yaw_rate = np.gradient(h, dt, axis=1)
    states = np.zeros((B, T1, STATE_SIZE))
    states[..., X], states[..., Y], states[..., HEADING] = poses[..., 0], poses[..., 1], wrap_angle(h)
    states[..., VX] = v
    states[..., AX] = np.gradient(v, dt, axis=1)
    states[..., AY] = v * yaw_rate  # centripetal
    states[..., YAW_RATE] = yaw_rate
    states[..., YAW_ACCEL] = np.gradient(yaw_rate, dt, axis=1)
    states[:, 0] = initial
    states[:, 0, X:HEADING + 1] = poses[:, 0]
    return states


def initial_state(pose: np.ndarray, speed: float, accel: float, accel_lat: float, yaw_rate: float = 0.0, protocol: Protocol = DEFAULT,
                  speed_lat: float = 0.0) -> np.ndarray:
    """(11,) state at t=0 from the logged ego status, as the devkit builds it: rear-axle pose, velocity
    (vx, vy) and acceleration (ax, ay) from the log, steering angle 0, steering rate 0, angular velocity and
    acceleration 0 (navsim navsim/planning/scenario_builder/navsim_scenario_utils.py:34-46 builds the EgoState
    with tire_steering_angle=0; navsim .../pdm_planner/utils/pdm_array_representation.py:73-91 reads it into the
    state array). `yaw_rate` (the logged one) is accepted and ignored, so callers need not know this.
    """
    del yaw_rate, protocol
    s = np.zeros(STATE_SIZE)
    s[X:HEADING + 1] = pose
    s[VX], s[VY], s[AX], s[AY] = speed, speed_lat, accel, accel_lat
    return s


def simulate(reference: np.ndarray, initial: np.ndarray, tracking: bool = True, protocol: Protocol = DEFAULT, dt: float = 0.1) -> np.ndarray:
    """(B, T+1, 3) global reference poses (t=0 first) + (B, 11) initial states -> (B, T+1, 11) states."""
    if tracking:
        return track(reference, initial, protocol, dt)
    return states_from_poses(reference, initial, dt)
