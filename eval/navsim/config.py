"""Constants of the NAVSIM PDMS (v1) / EPDMS (v2) scorer, named as in the official devkit.

Every number here comes from the official devkit (read from autonomousvision/navsim, main ~ v2.2
and v1.1; summarised in docs/methods/navsim_epdms.md). They are grouped in frozen dataclasses so a caller can see, and only deliberately change, the
protocol it is scoring under.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.constants import REAR_AXLE_TO_CENTER

# State array layout shared by the simulator, the metrics and the comfort checks (devkit's StateIndex).
X, Y, HEADING, VX, VY, AX, AY, STEER, STEER_RATE, YAW_RATE, YAW_ACCEL = range(11)
STATE_SIZE = 11

# Sub-metric columns of the official v2 output CSV, in order.
V2_COLUMNS = (
    "no_at_fault_collisions",
    "drivable_area_compliance",
    "driving_direction_compliance",
    "traffic_light_compliance",
    "ego_progress",
    "time_to_collision_within_bound",
    "lane_keeping",
    "history_comfort",
    "two_frame_extended_comfort",
)
MULTIPLICATIVE_V2 = ("no_at_fault_collisions", "drivable_area_compliance", "driving_direction_compliance", "traffic_light_compliance")
WEIGHTS_V2 = {"ego_progress": 5.0, "time_to_collision_within_bound": 5.0, "lane_keeping": 2.0, "history_comfort": 2.0, "two_frame_extended_comfort": 2.0}
MULTIPLICATIVE_V1 = ("no_at_fault_collisions", "drivable_area_compliance")
WEIGHTS_V1 = {"time_to_collision_within_bound": 5.0, "ego_progress": 5.0, "comfort": 2.0}

AGENT_TYPES = ("vehicle", "pedestrian", "bicycle")  # collisions with anything else (static objects) cost 0.5


@dataclass(frozen=True)
class VehicleParams:
    """Ego footprint: nuPlan's Chrysler Pacifica (rear axle is the reference point)."""

    length: float = 5.176
    width: float = 2.297
    front_length: float = 4.049  # rear axle -> front bumper
    rear_length: float = 1.127  # rear axle -> rear bumper
    wheel_base: float = 3.089
    rear_axle_to_center: float = REAR_AXLE_TO_CENTER


@dataclass(frozen=True)
class TrackerParams:
    """LQR tracker on a kinematic bicycle model (devkit's BatchLQRTracker / BatchKinematicBicycleModel)."""

    q_longitudinal: float = 10.0
    r_longitudinal: float = 1.0
    q_lateral: tuple = (1.0, 10.0, 0.0)
    r_lateral: float = 1.0
    tracking_horizon: int = 10
    jerk_penalty: float = 1e-4
    curvature_rate_penalty: float = 1e-2
    stopping_proportional_gain: float = 0.5
    stopping_velocity: float = 0.2
    accel_time_constant: float = 0.2
    steering_angle_time_constant: float = 0.05
    max_steering_angle: float = np.pi / 3


@dataclass(frozen=True)
class ScorerParams:
    """Thresholds of the sub-metrics (devkit's PDMScorerConfig)."""

    dt: float = 0.1  # simulation step [s]
    horizon_s: float = 4.0  # scored horizon [s] -> 41 states
    ego_stopped_speed: float = 5e-2  # NC: ego counts as stopped at or below this speed [m/s]
    # NC: an agent counts as stopped at or below this speed [m/s]. nuPlan's default: is_track_stopped
    # (nuplan-devkit nuplan/planning/simulation/observation/idm/utils.py:191-202, 5e-02), called without a threshold by
    # navsim .../pdm_planner/scoring/pdm_scorer_utils.py:44. Evaluated on the object's speed at the contact step.
    track_stopped_speed: float = 5e-2
    rear_angle_deg: float = 150.0  # "behind" beyond this angle from the ego heading (rear axle)
    # TTC: "ahead" within this angle of the ego heading (rear axle) [deg]: nuPlan's is_agent_ahead default
    # (nuplan-devkit .../observation/idm/utils.py:33-41, 30), called without a tolerance by pdm_scorer.py:566.
    ahead_angle_deg: float = 30.0
    driving_direction_horizon: float = 1.0  # DDC window [s]
    driving_direction_compliance_threshold: float = 2.0  # [m]
    driving_direction_violation_threshold: float = 6.0  # [m]
    ttc_stopped_speed: float = 5e-3  # [m/s]
    ttc_horizon: float = 1.0  # [s]; projections every 3 steps: 0, 0.3, 0.6, 0.9 s
    ttc_stride: int = 3
    ttc_last_step_v2: int = 31  # v2 evaluates ego steps 0..31
    progress_distance_threshold: float = 5.0  # EP: below this normaliser EP = 1 [m]
    lane_keeping_deviation_limit: float = 0.5  # [m]
    lane_keeping_horizon_window: float = 2.0  # [s] -> 20 consecutive steps
    traffic_light_hold_steps: int = 5  # a 2 Hz light status is held for 5 steps of 0.1 s
    map_radius: float = 100.0  # objects farther than this from the ego at t=0 are ignored [m]
    history_s: float = 1.5  # HC prepends this much logged past [s]
    ec_frame_gap_max: float = 0.55  # EC: previous frame at most this far back in the same log [s]
    # Log replay keeps the 2 Hz frames at t = 0, 0.5, ..., horizon_s only, as the metric cache
    # (navsim .../metric_caching/metric_cache_processor.py:116-125). None: every future frame of the scene.
    # v2 reads the frames up to horizon_s (4 s); the v1.1 metric cache read them up to 5 s
    # (navsim v1.1 navsim/planning/metric_caching/metric_cache_processor.py:101, time_horizon = 5.0).
    agent_frame_interval: float | None = 0.5
    agent_frame_horizon_v1: float = 5.0
    # The human-filter run always uses the logged future at 8 x 0.5 s, whatever the agent's sampling
    # (metric_cache_processor.py:288-311: the human trajectory is sampled at the scene's 2 Hz database interval).
    human_num_poses: int = 8
    human_interval: float = 0.5


@dataclass(frozen=True)
class ComfortParams:
    """Comfort bounds (strict) and Savitzky-Golay settings (devkit's pdm_comfort_metrics.py)."""

    min_lon_accel: float = -4.05
    max_lon_accel: float = 2.40
    max_abs_lat_accel: float = 4.89
    max_abs_mag_jerk: float = 8.37
    max_abs_lon_jerk: float = 4.13
    max_abs_yaw_accel: float = 1.93
    max_abs_yaw_rate: float = 0.95
    # two-frame extended comfort: RMS of the frame-to-frame difference must be <= these
    ec_accel: float = 0.7
    ec_jerk: float = 0.5
    ec_yaw_rate: float = 0.1
    ec_yaw_accel: float = 0.1


@dataclass(frozen=True)
class IDMParams:
    """PDM-Closed's IDM proposals as used by NAVSIM's metric caching."""

    speed_limit_fractions: tuple = (0.2, 0.4, 0.6, 0.8, 1.0)
    lateral_offsets: tuple = (0.0, -1.0, 1.0)  # centreline first, then the offsets [m] (+ = left)
    fallback_target_velocity: float = 15.0  # [m/s] when the lane has no speed limit
    min_gap_to_lead_agent: float = 1.0  # [m]
    headway_time: float = 1.5  # [s]
    accel_max: float = 1.5  # [m/s^2]
    decel_max: float = 3.0  # [m/s^2]
    acceleration_exponent: float = 10.0
    leading_agent_update_rate: int = 2  # leading agents are searched every 2nd step
    corridor_horizon_s: float = 5.0  # driving corridor length = max target speed * this [s]


@dataclass(frozen=True)
class Protocol:
    """Everything that defines a score: change a field and you are scoring a different benchmark."""

    vehicle: VehicleParams = field(default_factory=VehicleParams)
    tracker: TrackerParams = field(default_factory=TrackerParams)
    scorer: ScorerParams = field(default_factory=ScorerParams)
    comfort: ComfortParams = field(default_factory=ComfortParams)
    idm: IDMParams = field(default_factory=IDMParams)


DEFAULT = Protocol()
