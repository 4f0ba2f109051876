"""Closed-loop feedback for AutoScale on the simulator benchmark: train the fast pilot on a mixture, drive it.

    feedback = ClosedLoopFeedback(pool, envs=("highway", "merge"), episodes=12, seed=10_000)
    AutoScaleSelector().select(pool, 200, evaluator=feedback)

`ClosedLoopFeedback.evaluate(ids)` (curation.autoscale.MixtureEvaluator):
1. trains the fast pilot (eval/pilot.py: ridge on `curation.features.planner_inputs`, residual to a
   constant-speed/yaw-rate rollout) from scratch on `ids`;
2. drives it in highway-env with `eval.closed_loop.run_closed_loop` for `episodes` episodes cycling through
   `envs`, episode seeds `seed`, `seed + 1`, ... (use seeds no training scene came from; the simulator draws
   31-bit episode seeds, so small integers are practically disjoint);
3. optionally scores it open loop with EPDMS on held-out scenes (`heldout_ids`), mixed in with
   `open_loop_weight`.
The score (OURS, `metric`): "epdms" = mean closed-loop EPDMS of the executed drives (the project's metric;
a crashed episode scores 0, an unscored one 0 too);
"driving_score" = mean over episodes of route_completion x (no crash) x (on road); "no_crash" = 1 - crash
rate; "route_completion". Returned with the closed-loop means and the pilot's fit statistics.

Closed-loop observations have no future to read the driving command from, while the pilot learned from
scenes whose command came from their logged future. OURS: the planner adapter (command="route") gives the
pilot the command read from the route the observation carries, `datasets_cfg.sim.command.route_command`
(the one closed-loop observations carry: "left"/"right" when the route centreline `speed x 4 s` ahead is
turned by more than 0.35 rad or lies more than 3 m to the side; else "straight"; "unknown" without a route).
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from common.geometry import wrap_angle
from datasets_cfg.schema import Scene
from datasets_cfg.sim.command import route_command
from datasets_cfg.sim.world import SimWarnings

METRICS = ("epdms", "driving_score", "no_crash", "route_completion")
NO_HELDOUT = "__autoscale_closed_loop_only__"  # FastPilot needs an evaluation id; none is used closed loop only


def pilot_planner(pilot, command: str = "route"):
    """A closed-loop planner (`Scene -> (num_poses, 3)`) from a fitted `eval.pilot.FastPilot`."""
    from curation.features import planner_inputs
    from eval.pilot import constant_rollout

    if pilot.estimator_ is None:
        raise RuntimeError("pilot_planner: fit the pilot first")

    def plan(obs: Scene) -> np.ndarray:
        if command == "route":
            obs = Scene(dict(obs.row, command=route_command(obs)), obs.root)
        x = planner_inputs(obs, interval=pilot.interval)
        r = pilot.estimator_.predict(x[None]).reshape(pilot.num_poses, 3)
        p = constant_rollout(obs, pilot.num_poses, pilot.interval) + r
        p[:, 2] = wrap_angle(p[:, 2])
        return p

    return plan


def episode_score(row: dict, metric: str) -> float:
    if metric == "epdms":
        return float(row["epdms"]) if row["epdms"] is not None and not math.isnan(row["epdms"]) else 0.0
    if metric == "no_crash":
        return float(not row["crashed"])
    rc = row["route_completion"]
    rc = 0.0 if rc is None or (isinstance(rc, float) and math.isnan(rc)) else float(rc)
    if metric == "route_completion":
        return rc
    return rc * float(not row["crashed"]) * float(not row["offroad"])  # driving_score


class ClosedLoopFeedback:
    """AutoScale's `MixtureEvaluator` for highway-env (see the module doc)."""

    def __init__(self, pool, *, envs: Sequence[str] = ("highway", "merge", "roundabout", "intersection"), episodes: int = 8,
                 seed: int = 10_000, duration_s: float = 10.0, metric: str = "epdms", pilot_model: str = "ridge", pilot_alpha: float = 100.0,
                 heldout_ids: Sequence[str] | None = None, open_loop_weight: float = 0.0, command: str = "route", random_state: int = 0):
        if metric not in METRICS:
            raise ValueError(f"ClosedLoopFeedback: metric must be one of {METRICS}, got {metric!r}")
        if not 0.0 <= open_loop_weight <= 1.0 or (open_loop_weight > 0 and not heldout_ids):
            raise ValueError("ClosedLoopFeedback: open_loop_weight must be in [0, 1] and needs heldout_ids when > 0")
        if command not in ("route", "as_is"):
            raise ValueError(f"ClosedLoopFeedback: command must be 'route' or 'as_is', got {command!r}")
        self.pool, self.envs, self.episodes, self.seed, self.duration_s = pool, tuple(envs), int(episodes), int(seed), float(duration_s)
        self.metric, self.pilot_model, self.pilot_alpha = metric, pilot_model, pilot_alpha
        self.heldout_ids, self.open_loop_weight, self.command, self.random_state = list(heldout_ids or []), open_loop_weight, command, random_state
        self.calls = 0
        self.history: list[dict] = []
        self.sim_warnings = SimWarnings()  # highway-env's warnings over every evaluate() (datasets_cfg/sim/world.py)

    def pilot(self):
        from eval.pilot import FastPilot

        return FastPilot(self.pool, self.heldout_ids or [NO_HELDOUT], model=self.pilot_model, alpha=self.pilot_alpha, random_state=self.random_state)

    def fit(self, ids: Sequence[str]):
        return self.pilot().fit(list(ids))

    def closed_loop(self, pilot):
        from eval.closed_loop import run_closed_loop

        return run_closed_loop(pilot_planner(pilot, self.command), envs=self.envs, episodes=self.episodes, seed=self.seed, duration_s=self.duration_s)

    def evaluate(self, ids: Sequence[str]) -> dict:
        t0 = time.perf_counter()
        pilot = self.fit(ids)
        t1 = time.perf_counter()
        res = self.closed_loop(pilot)
        warned = getattr(res, "sim_warnings", None)
        if warned is not None:  # summed over calls; `mose curate` prints sim_warnings.summary() once
            self.sim_warnings.update(warned)
        closed = float(np.mean([episode_score(r, self.metric) for r in res.episodes]))
        out = {"score": closed, "closed_loop_score": closed, "n_train": float(pilot.n_train_), "fit_s": t1 - t0}
        out.update({f"cl_{k}": float(v) for k, v in res.means.items() if isinstance(v, (int, float))})
        out["sim_warnings"] = float(warned.total if warned is not None else 0)
        if self.open_loop_weight > 0:
            from eval.navsim.scorer import mean_score

            open_ = float(mean_score(pilot.score_rows(self.heldout_ids)))
            out["open_loop_epdms"] = open_
            out["score"] = (1 - self.open_loop_weight) * closed + self.open_loop_weight * open_
        out["eval_s"] = time.perf_counter() - t0
        self.calls += 1
        self.history.append(out)
        return out
