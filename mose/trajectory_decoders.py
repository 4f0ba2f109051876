"""Trajectory decoders: how a MoSE answer becomes the 8 planned poses, behind one interface.

The step-by-step answer (mose/skill_format.py) stays the model's one single-turn output. Where its trajectory
comes from is chosen in the model config, `MoSEConfig.trajectory_decoder` (recorded in config.json):

- ``"text"`` (default; every existing checkpoint): the `[trajectory]` line's decimals, read by
  `mose.skill_format.parse_answer`. Headings from the answer when it gives them, else from the direction between
  consecutive poses (`headings_from_xy`).
- ``"head"``: a small planning head (`PlanningHead`, a 2-layer MLP) on the text decoder's last hidden state (after
  the final norm) at the **plan token**, with the mean hidden state over the prompt and the ego speed
  (`plan_features`), predicts a residual (dx, dy) per pose to a kinematic prior; the poses are
  prior + residual. The plan token is the **last prompt token** (the end of the assistant header, the position that
  also predicts the answer's first token): it exists in the same forward pass at training time (teacher forcing) and
  at inference (the prompt's prefill), and does not depend on the generated text parsing (a `[trajectory]`-tag
  position would need the tag to be generated first and a second forward pass). The prior is constant velocity
  from the prompt's ego speed v (`constant_velocity_prior`): x_k = v * t_k, y_k = 0 in the ego frame,
  t_k = 0.5 s * k, k = 1..8. The speed is a model input (`ego_speed`, shape (B,)) next to `input_ids`, read from
  the prompt itself (`prompt_ego_speed`: the "Ego speed: 8.0 m/s." sentence of
  `datasets_cfg.skill_items.hierarchical_prompt`), in training (the collator) and at inference (the planner) alike,
  so the prior is exactly the ego state the model is shown; a prompt without it has no prior (no head loss;
  the planner then assumes 0 m/s). The head's last layer
  starts at zero, so an untrained head returns the prior itself. Trained jointly with the LM loss: smooth-L1 on the
  residual (target poses - prior), averaged over poses and coordinates of the items that have a target
  (`plan_loss`), weighted by the stage's `losses.plan`. The head's poses (two decimals) are written back into the
  answer's `[trajectory]` line (`write_trajectory`), so the answer stays one readable output whose trajectory parses
  back to exactly the poses that were planned.

Why a head and a residual: on the tiny preset (4.3M parameters, 60 training / 24 held-out simulator scenes, 300
steps) absolute decimals in text reached ADE 9.4 m (EPDMS 0.41), a head on absolute poses 10.8 m (0.43), a head on
the residual to constant velocity 1.44 m (0.65; constant velocity alone 1.42 m). A regression head on the LLM's
hidden state follows LMDrive (arXiv:2312.07488: waypoints regressed from the LLM's output tokens by an MLP) and
ReCogDrive (a planner conditioned on the VLM's hidden states); the kinematic prior is our choice.

`"tokens"` (waypoint tokens in the vocabulary, AutoVLA-style) is not implemented.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import nn

from mose.skill_format import NUM_POSES, POSE_INTERVAL_S, TRAJECTORY_SKILL, format_trajectory, parse_answer, parse_trajectory

DECODERS = ("text", "head")
# the ego-state sentence of datasets_cfg.skill_items.hierarchical_prompt ("Ego speed: 8.0 m/s.")
_EGO_SPEED = re.compile(r"Ego speed: (-?\d+(?:\.\d+)?) m/s\.")
_TRAJ_LINE = re.compile(r"^[ \t]*\[" + TRAJECTORY_SKILL + r"\][^\n]*", re.MULTILINE)


def check_decoder(name) -> str:
    if name not in DECODERS:
        raise ValueError(f"MoSEConfig.trajectory_decoder: expected one of {DECODERS}, got {name!r} "
                         "('text': decimals in the answer; 'head': planning head on a constant-velocity prior).")
    return name


def prompt_ego_speed(prompt: str) -> float:
    """The ego speed (m/s) a hierarchical prompt states, or NaN when it states none."""
    m = _EGO_SPEED.search(prompt if isinstance(prompt, str) else "")
    return float(m.group(1)) if m else float("nan")


def constant_velocity_prior(speed, num_poses: int = NUM_POSES, interval: float = POSE_INTERVAL_S) -> torch.Tensor:
    """(B, num_poses, 2) ego-frame poses of constant velocity: x_k = v * k * interval, y_k = 0 (speed: (B,) m/s)."""
    v = torch.as_tensor(speed, dtype=torch.float32).reshape(-1)
    t = torch.arange(1, num_poses + 1, dtype=v.dtype, device=v.device) * interval
    return torch.stack([v[:, None] * t[None, :], torch.zeros(len(v), num_poses, dtype=v.dtype, device=v.device)], dim=-1)


SPEED_SCALE = 10.0  # m/s per unit of the head's speed input (highway speeds 0-40 m/s -> 0-4)


def plan_features(hidden: torch.Tensor, index: torch.Tensor, attention_mask: torch.Tensor | None, speed: torch.Tensor) -> torch.Tensor:
    """(B, 2H + 1) planning-head input: [the hidden state at the plan token, the mean hidden state over the attended
    prompt positions up to it, speed / SPEED_SCALE (NaN -> 0)].

    Why not the plan token alone: its LM target is always the answer's first token (`<perception>`), so training
    drives its state towards one constant and it carries little of the scene; the prompt mean keeps what every
    position saw (route command, lead vehicle, lane). The speed is the prior's own input, so the head can make the
    correction speed-dependent (a residual that grows with the distance covered)."""
    batch, seq = hidden.shape[:2]
    idx = index.clamp_min(0)
    pos = torch.arange(seq, device=hidden.device)
    keep = pos[None, :] <= idx[:, None]
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = keep & attention_mask[:, -seq:].bool()
    w = keep.to(hidden.dtype)
    mean = (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
    at = hidden[torch.arange(batch, device=hidden.device), idx]
    v = torch.nan_to_num(speed.to(hidden.dtype), nan=0.0).reshape(batch, 1) / SPEED_SCALE
    return torch.cat([at, mean, v], dim=-1)


class PlanningHead(nn.Module):
    """plan features (B, 2H + 1) (`plan_features`) -> residual (B, num_poses, 2): Linear(2H + 1, H) - SiLU -
    Linear(H, 2 * num_poses), last layer zero."""

    def __init__(self, hidden_size: int, num_poses: int = NUM_POSES):
        super().__init__()
        self.num_poses = num_poses
        self.fc_in = nn.Linear(2 * hidden_size + 1, hidden_size)
        self.act = nn.SiLU()
        self.fc_out = nn.Linear(hidden_size, 2 * num_poses)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.fc_in.weight, std=1.0 / math.sqrt(self.fc_in.in_features))
        nn.init.zeros_(self.fc_in.bias)
        nn.init.zeros_(self.fc_out.weight)  # residual 0 at init: the untrained head plans the prior
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(hidden))).view(hidden.shape[0], self.num_poses, 2)


def plan_loss(residual: torch.Tensor, prior: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (beta 1 m) between the predicted residual and targets - prior, mean over poses, coordinates and the
    items with `mask` True; 0 (still attached to the graph) when no item has a target."""
    m = mask.bool()
    if not bool(m.any()):
        return residual.sum() * 0.0
    want = (targets.to(residual.dtype) - prior.to(residual.dtype))[m]
    return nn.functional.smooth_l1_loss(residual[m], want, beta=1.0)


def write_trajectory(answer: str, xy) -> str:
    """The answer with its `[trajectory]` line replaced by `xy` (two decimals); without one, the line goes before
    `</planning>`, or, without a planning step, in a new `<planning>` step at the end."""
    line = f"[{TRAJECTORY_SKILL}] {format_trajectory(xy)}"
    answer = answer if isinstance(answer, str) else ""
    if _TRAJ_LINE.search(answer):
        return _TRAJ_LINE.sub(lambda _: line, answer, count=1)
    close = answer.rfind("</planning>")
    if close >= 0:
        head = answer[:close]
        return head + ("" if not head or head.endswith("\n") else "\n") + line + "\n" + answer[close:]
    return (answer + "\n" if answer else "") + f"<planning>\n{line}\n</planning>"


def trajectory_target(target: str, num_poses: int = NUM_POSES) -> np.ndarray | None:
    """(num_poses, 2) poses of a target's `[trajectory]` line, or None when it has no complete one."""
    m = _TRAJ_LINE.search(target or "")
    if not m:
        return None
    xy, _, errors = parse_trajectory(m.group(0), num_poses)
    return xy if xy is not None and not errors and len(xy) == num_poses else None


def headings_from_xy(xy: np.ndarray, min_step: float = 0.05) -> np.ndarray:
    """(n,) headings along a polyline of (n, 2) ego-frame positions starting after the origin (0, 0)."""
    pts = np.vstack([[0.0, 0.0], np.asarray(xy, float)])
    d = np.diff(pts, axis=0)
    out, last = np.zeros(len(d)), 0.0
    for i, (dx, dy) in enumerate(d):
        if math.hypot(dx, dy) >= min_step:
            last = math.atan2(dy, dx)
        out[i] = last
    return out


class TextDecoder:
    """Poses from the answer's decimals (today's behaviour)."""

    name = "text"

    def __init__(self, taxonomy, num_poses: int = NUM_POSES):
        self.taxonomy, self.num_poses = taxonomy, num_poses

    def poses(self, answer: str, context: dict | None = None) -> tuple[np.ndarray | None, dict]:
        """(poses (n, 3) or None, info): info has "format_ok", "trajectory_points", "errors", "reason"."""
        n_want = self.num_poses
        parsed = parse_answer(answer, self.taxonomy, n_want)
        n = 0 if parsed.trajectory is None else len(parsed.trajectory)
        info = {"format_ok": parsed.ok, "trajectory_points": n, "errors": parsed.errors[:8], "reason": ""}
        if not parsed.trajectory_complete:
            traj_errors = [e for e in parsed.errors if "trajectory" in e] or parsed.errors
            info["reason"] = "unparseable model output: " + ("; ".join(traj_errors[:3]) or "no trajectory")
            return None, info
        xy = parsed.trajectory[:n_want]
        heading = parsed.headings[:n_want] if parsed.headings is not None else headings_from_xy(xy)
        return np.column_stack([xy, heading]), info


class HeadDecoder:
    """Poses from the planning head (`context["plan_xy"]`: (num_poses, 2) = prior + residual), rounded to two
    decimals and written into the answer's trajectory line (`info["answer"]`); the rest of the answer is parsed only
    for the report (format_ok, errors)."""

    name = "head"

    def __init__(self, taxonomy, num_poses: int = NUM_POSES):
        self.taxonomy, self.num_poses = taxonomy, num_poses

    def poses(self, answer: str, context: dict | None = None) -> tuple[np.ndarray | None, dict]:
        xy = None if context is None else context.get("plan_xy")
        if xy is None:
            raise ValueError("HeadDecoder.poses: context['plan_xy'] (the planning head's poses) is missing")
        xy = np.round(np.asarray(xy, dtype=np.float64).reshape(self.num_poses, 2), 2)
        if not np.isfinite(xy).all():
            return None, {"format_ok": False, "trajectory_points": 0, "errors": ["planning head gave non-finite poses"],
                          "reason": "planning head gave non-finite poses", "answer": answer}
        text = write_trajectory(answer, xy)
        parsed = parse_answer(text, self.taxonomy, self.num_poses)
        info = {"format_ok": parsed.ok, "trajectory_points": self.num_poses, "errors": parsed.errors[:8], "reason": "",
                "answer": text}
        return np.column_stack([xy, headings_from_xy(xy)]), info


def make_decoder(name: str, taxonomy, num_poses: int = NUM_POSES):
    return {"text": TextDecoder, "head": HeadDecoder}[check_decoder(name)](taxonomy, num_poses)


__all__ = ["DECODERS", "PlanningHead", "TextDecoder", "HeadDecoder", "make_decoder", "check_decoder", "constant_velocity_prior",
           "plan_features", "SPEED_SCALE", "plan_loss", "write_trajectory", "trajectory_target", "headings_from_xy", "prompt_ego_speed"]
