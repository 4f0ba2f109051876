"""Reference agents, to sanity-check any dataset: each maps scenes to {token: (N, 3) poses in the current ego
rear-axle frame at interval, 2*interval, ...}, the form the scorer and the predictions files use.

- `constant_velocity`: NAVSIM's ConstantVelocityAgent: keep the current speed and heading (a straight line).
- `human`: the logged future (ground truth), i.e. NAVSIM's HumanAgent.
- `pdm_closed`: the PDM-Closed planner (the EP reference) run as an agent.
Scenes an agent cannot handle (a log too short for the human, no map for PDM-Closed) are left out; the
scorer reports them as invalid rows with the reason.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from common.geometry import global_to_local
from eval.navsim.config import DEFAULT, Protocol

AGENTS = ("constant_velocity", "human", "pdm_closed")


def constant_velocity(scenes: Iterable, num_poses: int = 8, interval: float = 0.5) -> dict[str, np.ndarray]:
    out = {}
    t = np.arange(1, num_poses + 1) * interval
    for s in scenes:
        v = float(s.row["ego"]["speed"][s.current_index]) if len(s.row["ego"]["speed"]) else 0.0
        out[s.id] = np.stack([v * t, np.zeros_like(t), np.zeros_like(t)], -1)
    return out


def human(scenes: Iterable, num_poses: int = 8, interval: float = 0.5) -> dict[str, np.ndarray]:
    out = {}
    for s in scenes:
        try:
            out[s.id] = s.future_trajectory(num_poses, interval, frame="ego")
        except ValueError:
            continue  # the log ends too early
    return out


def pdm_closed(scenes: Iterable, num_poses: int = 8, interval: float = 0.5, protocol: Protocol = DEFAULT, version: str = "v2",
               batch: int = 64) -> dict[str, np.ndarray]:
    from eval.navsim.context import SceneContext, SceneError
    from eval.navsim.pdm_closed import plan_batch

    dt = protocol.scorer.dt
    steps = np.round(np.arange(1, num_poses + 1) * interval / dt).astype(int)
    ctxs, out = [], {}

    def flush():
        for c, plan in zip(ctxs, plan_batch(ctxs, protocol, version)):
            idx = np.minimum(steps, len(plan.poses) - 1)
            out[c.id] = global_to_local(plan.poses[idx], c.origin)
        ctxs.clear()

    for s in scenes:
        try:
            ctxs.append(SceneContext.build(s, protocol))
        except SceneError:
            continue
        if len(ctxs) >= batch:
            flush()
    if ctxs:
        flush()
    return out


def run_agent(name: str, scenes: Iterable, num_poses: int = 8, interval: float = 0.5) -> dict[str, np.ndarray]:
    fns = {"constant_velocity": constant_velocity, "human": human, "pdm_closed": pdm_closed}
    if name not in fns:
        raise ValueError(f"unknown agent {name!r}; expected one of {AGENTS}")
    return fns[name](scenes, num_poses=num_poses, interval=interval)
