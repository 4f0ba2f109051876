"""Offline fixtures for the skill dataset tests: tiny tokenizers and processors built from constructor args,
and driving scenes in the real ScenePool format (no download anywhere)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datasets_cfg.schema import new_row

CORPUS = [
    "<perception> </perception> <prediction> </prediction> <planning> </planning> [vehicles] [trajectory]",
    "The vehicle 12 m ahead in the ego lane will slow down from 8.0 to 5.0 m/s in the next 4.0 s.",
    "Keep the lane. Accelerate from 5.0 to 7.5 m/s. Stop before the red light. Daytime, clear weather.",
    "trajectory: [(1.00, 0.00), (2.50, -0.10), (3.75, 0.05)] High risk: the closest approach is 3.0 m.",
    "You are driving the ego car in this scene. Driving command: go straight. Ego speed: 2.0 m/s.",
    "Describe the object in the box and explain why it affects the ego car. A traffic cone; keep away.",
]


def train_tokenizer(style: str = "llava", vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on a small corpus, with a ChatML template (mose.skill_tokenizer).

    style "llava": `<image>` placeholder; "qwen2vl": `<|vision_start|><|image_pad|><|vision_end|>`.
    """
    from mose.skill_tokenizer import train_chat_tokenizer

    if style == "llava":
        return train_chat_tokenizer(CORPUS * 5, vocab_size)
    return train_chat_tokenizer(CORPUS * 5, vocab_size, image_token="<|image_pad|>", extra_specials=("<|vision_start|>", "<|vision_end|>"),
                                image_placeholder="<|vision_start|><|image_pad|><|vision_end|>")


def llava_processor(image_size: int = 32, patch_size: int = 8):
    from transformers import LlavaProcessor, SiglipImageProcessor

    tok = train_tokenizer("llava")
    ip = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="full",
                          chat_template=tok.chat_template)


def qwen2vl_processor():
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class OfflineQwen2VLProcessor(Qwen2VLProcessor):
        # transformers 5.23 cannot type-check a missing video processor without torchvision installed; images only here
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = train_tokenizer("qwen2vl")
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2, temporal_patch_size=2)
    return OfflineQwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)


def write_image(path: Path, size=(48, 40), seed: int = 0) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def driving_row(scene_id: str = "s0", *, image: str | None = None, lead_brakes: bool = True, lane_change: bool = False,
                red_light: bool = True, qa: bool = True) -> dict:
    """A straight road along +x: ego at 8 m/s (rear axle), a lead vehicle 12 m ahead braking from 8 to ~4 m/s,
    a cone 15 m ahead on the right, 4 s of future at 0.5 s (frames -1.0 .. +4.0 s, current index 2)."""
    t = [-1.0 + 0.5 * k for k in range(11)]
    ego_x = [8.0 * ti for ti in t]
    ego_y = [(min(max(ti, 0.0), 3.0) / 3.0 * 3.5 if lane_change else 0.0) for ti in t]
    frames, cur = range(11), 2
    brake = 1.0 if lead_brakes else 0.0  # m/s^2 from t = 0
    lead_v = [8.0 - brake * max(ti, 0.0) for ti in t]
    lead_x = [12.0 + 8.0 * ti - 0.5 * brake * max(ti, 0.0) ** 2 for ti in t]
    agents = {"frame": [], "track_id": [], "category": [], "x": [], "y": [], "heading": [], "length": [], "width": [],
              "height": [], "vx": [], "vy": []}

    def add(f, tid, cat, x, y, vx, size=(4.5, 1.9, 1.6)):
        for k, v in zip(("frame", "track_id", "category", "x", "y", "heading", "length", "width", "height", "vx", "vy"),
                        (f, tid, cat, x, y, 0.0, *size, vx, 0.0)):
            agents[k].append(v)

    for f in frames:
        add(f, "lead", "vehicle", lead_x[f], 0.0, lead_v[f])
        add(f, "cone", "traffic_cone", 15.0, -3.0, 0.0, (0.4, 0.4, 0.7))
    lanes = [{"id": "L1", "kind": "lane", "centerline": [[-20.0, 0.0], [80.0, 0.0]],
              "polygon": [[-20.0, -1.75], [80.0, -1.75], [80.0, 1.75], [-20.0, 1.75]], "speed_limit": 13.9, "on_route": True}]
    qas = []
    if qa:
        qas = [
            {"qid": f"{scene_id}:general:vehicle", "task": "general", "question": "Describe the vehicles around the ego car.",
             "answer": "There is 1 vehicle within 50 m. A white car 12.0 m ahead in the ego lane, braking; it slows the ego car.",
             "category": "vehicle", "box": [], "skills": []},
            {"qid": f"{scene_id}:region:cone", "task": "region", "question": "Describe the object inside the box [30.0, 20.0, 4.0, 4.0].",
             "answer": "An orange traffic cone on the right shoulder; keep clear of it.", "category": "traffic_cone",
             "box": [30.0, 20.0, 4.0, 4.0], "skills": []},
            {"qid": f"{scene_id}:suggestion", "task": "suggestion", "question": "What should the ego car do next?",
             "answer": "Slow down and keep a safe distance from the braking car. Stay in the current lane. Obey the red light ahead.",
             "category": "driving_suggestion", "box": [], "skills": []},
            {"qid": f"{scene_id}:trajectory", "task": "trajectory", "question": "Plan the next 4 seconds.",
             "answer": "Planned poses: [" + ", ".join(f"({8.0 * 0.5 * k:.1f}, 0.0)" for k in range(1, 9)) + "]",
             "category": "planning", "box": [], "skills": []},
        ]
    return new_row(
        scene_id, "unit", "test", source="synthetic", location="straight", weather="sunny", lighting="day", command="straight",
        current_index=cur,
        ego={"t": t, "x": ego_x, "y": ego_y, "heading": [0.0] * 11, "speed": [8.0] * 11, "accel": [0.0] * 11,
             "accel_lat": [0.0] * 11, "yaw_rate": [0.0] * 11},
        agents=agents, map={"lanes": lanes, "areas": [], "route": ["L1"]},
        traffic_lights={"frame": [cur], "lane_id": ["L1"], "is_red": [red_light]},
        images=[{"frame": cur, "camera": "bev", "path": image}] if image else [],
        qa=qas, meta=json.dumps({"log_name": scene_id, "timestamp_s": 1.0}),
    )
