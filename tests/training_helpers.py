"""Fixtures of the training tests: a tiny simulator pool, stage manifests in the real Selection format, the shipped
tiny config pointed at them, and a callback that interrupts a run (a fake crash, named as one)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny.yaml"
ZERO2 = ROOT / "training" / "deepspeed" / "zero2.json"
ZERO3 = ROOT / "training" / "deepspeed" / "zero3.json"
STAGES = ("align", "router_pretrain", "skill_tune")


def make_pool(out: Path, scenes: int = 8) -> Path:
    from datasets_cfg.sim.corpus import generate

    generate(out, scenes, "highway", seed=0, synthetic_fraction=0.5, image_size=64, scenes_per_episode=4, progress=False)
    return out


def write_manifests(pool_dir: Path, out: Path, per_stage: dict[str, list[str]] | None = None) -> Path:
    """One manifest per stage (curation.selection.Selection, as `mose curate --plan` writes them)."""
    from curation.selection import Selection
    from datasets_cfg.schema import ScenePool

    ids = ScenePool.load(pool_dir).ids
    per_stage = per_stage or {"align": ids[:4], "router_pretrain": ids[4:8], "skill_tune": ids[:3]}
    out.mkdir(parents=True, exist_ok=True)
    for stage, chosen in per_stage.items():
        Selection(ids=list(chosen), scores=[1.0] * len(chosen), reasons=["test"] * len(chosen), method="random",
                  budget=max(len(chosen), 1), seed=0).write(out / f"{stage}.jsonl")
    return out


def tiny_config(out: Path, pool: Path, manifests: Path, *, deepspeed: Path | None = None, steps: int = 3, only=None, **overrides):
    """The shipped tiny config, pointed at the test pool, `steps` optimizer steps per stage, batch 2 (`only`: a subset
    of its stages); `overrides` maps dotted keys to values. The recipe is "pretrained" (each stage trains exactly its
    own groups: what these tests check); the from_scratch recipe the tiny preset gets by default has its own test."""
    from training.config import load_config

    ov = {"run.output_dir": str(out), "run.deepspeed": str(deepspeed) if deepspeed else None, "run.progress": False,
          "run.save_steps": 2, "data.pool": str(pool), "data.manifests": str(manifests), "data.max_length": 768,
          "model.recipe": "pretrained"}
    for s in STAGES:
        ov[f"stages.{s}.max_steps"] = steps
        ov[f"stages.{s}.batch_size"] = 2
        ov[f"stages.{s}.warmup_ratio"] = 0.0
    ov.update(overrides)
    cfg = load_config(TINY, ov)
    if only is not None:
        cfg.stages = {k: v for k, v in cfg.stages.items() if k in only}
    return cfg


class CaptureMerged(TrainerCallback):
    """At the end of each stage's training: (stage dir, a CPU copy of the in-memory model with its LoRA adapters merged
    by peft itself, its state dict under plain names). The reference for the exported checkpoint."""

    def __init__(self):
        self.models = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        import copy

        from peft.tuners.lora import LoraLayer

        m = copy.deepcopy(model).cpu().eval()
        for module in m.modules():
            if isinstance(module, LoraLayer):
                module.merge()
        sd = {k.replace(".base_layer.", "."): v for k, v in m.state_dict().items() if "lora_" not in k}
        self.models.append((Path(args.output_dir), m, sd))


class FakeCrash(RuntimeError):
    """Raised by `CrashAfter` to interrupt a run mid-stage, as a kill would."""


class CrashAfter(TrainerCallback):
    """Raises once step `stage_steps` has been logged (its JSONL row written), before any later checkpoint."""

    def __init__(self, stage_steps: int):
        self.stage_steps = stage_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step >= self.stage_steps and logs and "loss" in logs:
            raise FakeCrash(f"fake crash after step {state.global_step}")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict as plain transformers loads it (file keys follow transformers' saved layout)."""
    from mose.modeling import MoSEForConditionalGeneration

    return MoSEForConditionalGeneration.from_pretrained(str(path)).state_dict()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def changed(a: dict, b: dict, atol: float = 0.0) -> set[str]:
    return {k for k in a if not torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol)}


def finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


_SHARED: dict = {}


def shared(key: str, build):
    """Build once per test session (module-level memo shared by the training test files)."""
    if key not in _SHARED:
        _SHARED[key] = build()
    return _SHARED[key]


def session_pool(tmp_path_factory) -> tuple[Path, Path]:
    """(pool, manifests) of 8 simulator scenes, built once per session."""
    def build():
        base = tmp_path_factory.mktemp("train_pool")
        pool = make_pool(base / "pool")
        return pool, write_manifests(pool, base / "manifests")

    return shared("pool", build)


def baseline_run(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny pipeline (3 stages x 3 steps) with plain PyTorch, run once per session: (output dir, result)."""
    def build():
        from training.runner import run_training

        pool, manifests = session_pool(tmp_path_factory)
        out = tmp_path_factory.mktemp("train_plain")
        cap = CaptureMerged()
        result = run_training(tiny_config(out, pool, manifests), callbacks=[cap], progress=False)
        result["captured"] = {p.name: (m, sd) for p, m, sd in cap.models}
        return out, result

    return shared("baseline", build)


def initial_weights(cfg) -> dict[str, torch.Tensor]:
    """The state dict the run's first stage started from (the preset rebuilt with the run's processor and seed)."""
    from mose.skills import load_taxonomy
    from training.model_setup import initial_model, load_processor

    model = initial_model(cfg, load_taxonomy(cfg.data.taxonomy), load_processor(Path(cfg.run.output_dir) / "processor"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
