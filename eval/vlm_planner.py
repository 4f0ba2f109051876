"""A MoSE (or any transformers VLM) checkpoint as a planner: the step-by-step prompt, greedy generation, and the
trajectory read back from the answer with the skill-format parser.

- `answer_to_poses(answer, taxonomy, decoder="text", context=None)`: the answer -> (8, 3) poses (x, y, heading) in the
  ego frame through a trajectory decoder (mose/trajectory_decoders.py). "text": the planning segment's 8 (x, y)
  poses; headings come from the answer when it gives them, else from the direction between consecutive poses
  (the first from the origin); an answer without a complete 8-pose trajectory gives no poses and the reason.
  "head": the planning head's poses (`context["plan_xy"]`), written into the answer's trajectory line
  (`info["answer"]`). `ModelPlanner` uses the checkpoint's `config.trajectory_decoder`; for "head" it runs one more
  forward pass over the prompt with the speed the prompt states (the plan token is the last prompt token).
- `ModelPlanner(model_path, ..., taxonomy=tax)`: `planner(scene) -> (8, 3) poses` for eval/closed_loop.py. The prompt is the training set's
  hierarchical prompt (datasets_cfg/skill_items.py) for the observed scene. Its image is the scene's current frame
  when the observation has one; closed-loop observations carry none, so a top-down view is drawn from the
  observation's lanes and agents in the simulator's colours (`draw_topdown`, an approximation of the highway-env
  render the model was trained on, documented in the report). An unreadable answer raises ValueError, which the
  closed loop counts as a planner failure (the ego then brakes). `replan_every` = k: the model is asked every k-th
  call (k * 0.5 s in the closed loop); in between the planner returns the rest of its last plan in the current ego
  frame (the last step repeated at its end), or fails again when the last answer had no plan. Every call is kept in
  `decisions_`, with the tokens each answer generated (`new_tokens`).
- `answer=False` (a "head" checkpoint only; `load` refuses any other): the planner runs only the prompt's forward
  pass and plans from the planning head, without generating the step-by-step answer (its decisions have no answer).
  The poses are exactly those of `answer=True` (the head reads the prompt, never the answer); it is the fast path
  for the planning benchmark and the closed loop, where only the trajectory counts.

Generation goes through eval/coda_generate.Generator (the CODA evaluation's generator), one scene per call,
constrained by default to the answer grammar (mose/answer_grammar.py: every answer parses, 8 poses, within the
budget); `constrained=False` gives plain greedy decoding. `max_new_tokens` is the generation budget: pass one
computed from the data (`mose.answer_grammar.answer_budget` of the longest training target), never a constant that
can cut a correct answer; without one, `load` refuses.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from common.constants import REAR_AXLE_TO_CENTER
from mose.skill_format import NUM_POSES
from mose.skills import Taxonomy
from mose.trajectory_decoders import headings_from_xy, make_decoder, prompt_ego_speed

VIEW_METERS = 75.0  # the simulator render's field of view (datasets_cfg/sim/render.py)
ROAD, LINE, EGO, OTHER = (100, 100, 100), (255, 255, 255), (50, 200, 0), (100, 200, 255)


def answer_to_poses(answer: str, taxonomy: Taxonomy, num_poses: int = NUM_POSES, *, decoder: str = "text",
                    context: dict | None = None) -> tuple[np.ndarray | None, dict]:
    """(poses or None, info): info has "format_ok" (no parser error at all), "trajectory_points", "errors", "reason",
    and, for decoder "head", "answer" (the answer text with the head's poses written in)."""
    return make_decoder(decoder, taxonomy, num_poses).poses(answer, context)


def checkpoint_decoder(model_path: str | Path) -> str:
    """The trajectory decoder a checkpoint's config.json names ("text" when it names none: older checkpoints)."""
    import json

    cfg = Path(model_path) / "config.json"
    return json.loads(cfg.read_text()).get("trajectory_decoder", "text") if cfg.is_file() else "text"


def head_plan(generator, question: str, image: str) -> np.ndarray:
    """(8, 2) poses of a "head" checkpoint's planning head for one prompt (the generator's own prompt and inputs; the
    prior's speed is the one the question states, 0 m/s when it states none)."""
    import torch
    from PIL import Image

    with Image.open(image) as im:
        inputs = generator.processor_(images=[im.convert("RGB")], text=[generator._prompt(question)], return_tensors="pt", padding=True)
    inputs = inputs.to(generator.device_)
    model = generator.model_
    if "pixel_values" in inputs and model.dtype.is_floating_point:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    speed = prompt_ego_speed(question)
    speed = torch.tensor([speed if math.isfinite(speed) else 0.0], device=generator.device_)
    with torch.inference_mode():
        return model.plan(speed, **inputs)[0].float().cpu().numpy()


def draw_topdown(scene, image_size: int = 64):
    """A PIL image of the scene's current frame seen from above, centred on the ego (highway-env's layout: world
    x to the right, world y up, no rotation; lane outlines white on grey, ego green, other vehicles light blue)."""
    from PIL import Image, ImageDraw

    from common.geometry import box_corners

    ppm = image_size / VIEW_METERS
    ex, ey, eh = scene.ego_pose()
    meta = scene.meta
    axle = float(meta.get("ego_size", {}).get("rear_axle_to_center", REAR_AXLE_TO_CENTER))
    cx, cy = ex + axle * math.cos(eh), ey + axle * math.sin(eh)

    def px(points):
        p = np.asarray(points, float).reshape(-1, 2)
        return [(image_size / 2 + (x - cx) * ppm, image_size / 2 - (y - cy) * ppm) for x, y in p]

    im = Image.new("RGB", (image_size, image_size), ROAD)
    draw = ImageDraw.Draw(im)
    for lane in scene.row["map"]["lanes"]:
        if len(lane["polygon"]) >= 3:
            pts = px(lane["polygon"])
            draw.line(pts + pts[:1], fill=LINE, width=1)
    agents = scene.agents_at()
    for i in range(len(agents)):
        corners = box_corners(agents.xy[i, 0], agents.xy[i, 1], agents.heading[i], max(agents.length[i], 0.5), max(agents.width[i], 0.5))
        draw.polygon(px(corners), fill=OTHER)
    size = meta.get("ego_size", {})
    draw.polygon(px(box_corners(cx, cy, eh, float(size.get("length", 5.0)), float(size.get("width", 2.0)))), fill=EGO)
    return im


class ModelPlanner:
    """`planner(scene) -> (8, 3)` poses from a checkpoint's generated step-by-step answer (module doc)."""

    def __init__(self, model_path: str | Path, max_new_tokens: int | None = None, image_size: int = 64, replan_every: int = 1,
                 interval: float = 0.5, *, taxonomy: Taxonomy, constrained: bool = True, answer: bool = True):
        if replan_every < 1:
            raise ValueError(f"ModelPlanner: replan_every must be >= 1, got {replan_every}")
        self.model_path = str(model_path)
        self.max_new_tokens = max_new_tokens
        self.image_size = image_size
        self.replan_every = replan_every
        self.interval = interval
        self.taxonomy = taxonomy
        self.constrained = constrained
        self.answer = answer
        self.decisions_: list[dict] = []
        self._last = None  # (log name, frame time s, global ego pose, poses or None, reason) of the last model answer

    def load(self) -> "ModelPlanner":
        from eval.coda_generate import Generator

        self.decoder_ = checkpoint_decoder(self.model_path)
        if not self.answer and self.decoder_ != "head":
            raise ValueError(f"ModelPlanner({self.model_path}): answer=False plans from the planning head without an answer, but the "
                             f"checkpoint's trajectory_decoder is {self.decoder_!r}; only 'head' checkpoints can plan without answering")
        if self.max_new_tokens is None and self.answer:
            raise ValueError(f"ModelPlanner({self.model_path}): max_new_tokens is not set; pass the budget from the data "
                             "(mose.answer_grammar.answer_budget of the longest training target)")
        budget = int(self.max_new_tokens) if self.max_new_tokens is not None else 1  # answer=False generates nothing
        self.generator_ = Generator(self.model_path, batch_size=1, max_new_tokens=budget, constrained=self.constrained and self.answer,
                                    taxonomy=self.taxonomy).load()
        self._tmp = tempfile.TemporaryDirectory(prefix="mose-planner-")
        return self

    def _follow_last(self, scene):
        """(poses or None, reason) from the last plan, when this call is within its replanning period."""
        if self._last is None or self.replan_every == 1:
            return None
        log, t0, origin, poses, reason = self._last
        meta = scene.meta
        k = round((float(meta.get("timestamp_s", 0.0)) - t0) / self.interval)
        if meta.get("log_name") != log or not 0 < k < self.replan_every:
            return None
        if poses is None:
            return None, reason
        from common.geometry import global_to_local, local_to_global

        rest = local_to_global(poses[k:], origin)
        step = rest[-1] - (local_to_global(poses[k - 1:k], origin)[0] if len(rest) == 1 else rest[-2])
        pad = np.stack([rest[-1] + (j + 1) * step for j in range(k)])  # keep the last step's motion
        pad[:, 2] = rest[-1, 2]
        return global_to_local(np.vstack([rest, pad]), scene.ego_pose()), ""

    def __call__(self, scene) -> np.ndarray:
        from datasets_cfg.skill_items import hierarchical_prompt

        followed = self._follow_last(scene)
        if followed is not None:
            poses, reason = followed
            self.decisions_.append({"scene": scene.id, "image": None, "answer": None, "format_ok": None, "trajectory_points": None,
                                    "errors": [], "reason": reason, "followed_last_plan": True})
            if poses is None:
                raise ValueError(reason)
            return poses
        if not hasattr(self, "generator_"):
            self.load()
        paths = scene.image_paths(frame=scene.current_index)
        if paths and paths[0].is_file():
            image, drawn = str(paths[0]), False
        else:
            image, drawn = str(Path(self._tmp.name) / "frame.png"), True
            draw_topdown(scene, self.image_size).save(image)
        question = hierarchical_prompt(scene.row, self.taxonomy)
        decoder = self.decoder_
        context = {"plan_xy": head_plan(self.generator_, question, image)} if decoder == "head" else None
        if self.answer:
            answer = self.generator_.answer([{"question": question, "image": image}])[0]
            new_tokens = self.generator_.last_new_tokens_[0]
            poses, info = answer_to_poses(answer, self.taxonomy, decoder=decoder, context=context)
            answer = info.pop("answer", answer)
        else:  # the head's poses alone; no answer is generated, so there is no format to judge
            poses, info = answer_to_poses("", self.taxonomy, decoder=decoder, context=context)
            answer, new_tokens = None, 0
            info.pop("answer", None)
            info.update(format_ok=None, errors=[])
        self.decisions_.append({"scene": scene.id, "image": "drawn" if drawn else image, "answer": answer, **info, "new_tokens": new_tokens,
                                "followed_last_plan": False})
        meta = scene.meta
        self._last = (meta.get("log_name"), float(meta.get("timestamp_s", 0.0)), scene.ego_pose(), poses, info["reason"])
        if poses is None:
            raise ValueError(info["reason"])
        return poses

    def close(self) -> None:
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()


__all__ = ["ModelPlanner", "answer_to_poses", "headings_from_xy", "draw_topdown", "head_plan", "checkpoint_decoder"]
