"""Typed training configuration: one YAML file -> `TrainConfig`, validated before anything is built.

    run:    {output_dir, seed, deepspeed, precision, gradient_checkpointing, logging_steps, save_steps, ...}
    model:  {preset, preset_args, path, processor, dispatch, recipe}
    data:   {pool, manifests, taxonomy, max_length, max_images}
    stages: {align: {...}, router_pretrain: {...}, skill_tune: {...}}   # any subset; always run in that order

Every key is checked against the dataclasses below: an unknown key, an unknown stage name or a value of the
wrong type raises `ConfigError` naming the file and the dotted key (e.g. `tiny.yaml: stages.align.lrr`).
Stage fields left out take the stage's defaults from `training.stages.STAGES`. Relative paths are relative to
the working directory (like every `mose` command).
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.constants import STAGE_ORDER
from common.errors import MoseError

PRECISIONS = ("auto", "bf16", "fp32")
SAMPLERS = ("shuffle", "skill_balanced")
ITEM_KINDS = ("hierarchical", "single")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


class ConfigError(MoseError, ValueError):
    """A training config that cannot run; the message names the file, the key and what was expected."""


@dataclass
class RunConfig:
    output_dir: str = "runs/train"
    seed: int = 0
    deepspeed: str | None = "training/deepspeed/zero2.json"  # a DeepSpeed JSON; null = plain PyTorch (same Trainer)
    precision: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2
    num_workers: int = 0
    progress: bool = True


@dataclass
class ModelConfig:
    preset: str | None = None  # mose.presets.build_preset(name, **preset_args)
    preset_args: dict = field(default_factory=dict)
    path: str | None = None  # a MoSE checkpoint directory (from_pretrained) instead of a preset
    processor: str | None = None  # processor directory; default: the checkpoint's / the preset's
    dispatch: str | None = None  # override the expert dispatch (mose.config.DISPATCHES: "auto", "grouped_mm", "sort", "eager")
    # "pretrained": each stage trains its own groups; "from_scratch": every stage also trains the whole language model
    # (training.stages.FROM_SCRATCH_GROUPS); "auto": from_scratch when the model starts from random init (a preset
    # without pretrained weights), else pretrained. training.stages.resolve_recipe decides; the stage table prints it.
    recipe: str = "auto"


@dataclass
class DataConfig:
    pool: str = ""
    manifests: str = ""  # directory with <stage>.jsonl manifests (mose curate --plan ... --out DIR)
    taxonomy: str | None = None  # skill taxonomy YAML; default datasets_cfg/skills.yaml
    max_length: int | None = 2048  # items longer than this (tokens after image expansion) are skipped and counted
    max_images: int = 1


@dataclass
class LossConfig:
    """Weights of the loss terms: loss = lm * LM loss + balance * mean_layers(balance) + z * mean_layers(z) + skill * mean_layers(skill)
    + plan * planning-head loss. `plan` acts only for a model with `trajectory_decoder: head` (mose/trajectory_decoders.py)
    and on items with a trajectory target (hierarchical items); with the "text" decoder it changes nothing."""

    lm: float = 1.0
    balance: float = 0.01
    z: float = 0.001
    skill: float = 0.1
    plan: float = 1.0


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class PlanRefitConfig:
    """After the stage trains, refit the planning head alone, full batch, on the frozen features of the stage's items
    (mose/plan_head_fit.py says why). Only for a model with `trajectory_decoder: head`; steps 0 turns it off."""

    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 8  # items per forward pass while the features are collected


@dataclass
class ItemsConfig:
    """Which skill-dataset items of the stage's scenes it trains on."""

    kinds: list[str] = field(default_factory=lambda: list(ITEM_KINDS))  # "hierarchical" (step-by-step) and/or "single" (QA)
    roots: list[str] | None = None  # keep only items whose skills all lie under these coarse skills (None = all)
    tasks: list[str] | None = None  # keep only single items of these QA tasks (None = all)


@dataclass
class StageConfig:
    name: str = ""
    manifest: str | None = None  # default: <data.manifests>/<stage>.jsonl
    trainable: list[str] = field(default_factory=list)  # module groups (training.stages.GROUPS)
    items: ItemsConfig = field(default_factory=ItemsConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig | None = None
    plan_refit: PlanRefitConfig | None = None
    sampler: str = "shuffle"
    lr: float = 2e-5
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    source: str = "<config>"  # the file it came from (for error messages)

    def stage_names(self) -> list[str]:
        return [s for s in STAGE_ORDER if s in self.stages]

    def manifest_path(self, stage: str) -> Path:
        st = self.stages[stage]
        return Path(st.manifest) if st.manifest else Path(self.data.manifests) / f"{stage}.jsonl"

    def err(self, key: str, expected: str, got: Any = dataclasses.MISSING) -> ConfigError:
        got_s = "" if got is dataclasses.MISSING else f", got {got!r}"
        return ConfigError(f"{self.source}: {key}: expected {expected}{got_s}")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# ----------------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a YAML config; `overrides` maps dotted keys to values (e.g. {"data.pool": DIR})."""
    from common.yaml_file import read_yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = read_yaml(path, what="training config", expect=object, error=ConfigError) or {}
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return from_dict(raw, source=str(path))


def _set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def from_dict(raw: Any, source: str = "<dict>") -> TrainConfig:
    from training.stages import GROUPS, STAGES

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with keys run, model, data, stages; got {type(raw).__name__}")
    stages_raw = raw.get("stages")
    top = {k: v for k, v in raw.items() if k != "stages"}
    cfg = _build(TrainConfig, top, source, "", skip=("stages", "source"))
    cfg.source = source
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise cfg.err("stages", f"a mapping with at least one of {', '.join(STAGE_ORDER)}", stages_raw)
    for name, st in stages_raw.items():
        if name not in STAGE_ORDER:
            raise cfg.err(f"stages.{name}", f"a stage name, one of {', '.join(STAGE_ORDER)} (unknown stage)")
        merged = _merge(STAGES[name].defaults(), st if st is not None else {}, source, f"stages.{name}")
        stage = _build(StageConfig, merged, source, f"stages.{name}.", skip=("name",))
        stage.name = name
        cfg.stages[name] = stage
    _validate(cfg, GROUPS)
    return cfg


def _zero_stage(path: str) -> int | None:
    try:
        return json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def _merge(defaults: dict, given: Any, source: str, where: str) -> dict:
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {given!r}")
    out = dict(defaults)
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _build(cls, data: Any, source: str, prefix: str, skip: tuple = ()):
    """Instantiate dataclass `cls` from `data`, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{source}: {prefix}{unknown[0]}: unknown key; expected one of {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], source, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(value: Any, tp, source: str, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, source, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, source, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    return value


def _validate(cfg: TrainConfig, groups: tuple[str, ...]) -> None:
    run, model, data = cfg.run, cfg.model, cfg.data
    if run.precision not in PRECISIONS:
        raise cfg.err("run.precision", f"one of {', '.join(PRECISIONS)}", run.precision)
    for key in ("logging_steps", "save_steps", "save_total_limit"):
        if getattr(run, key) < 1:
            raise cfg.err(f"run.{key}", "an integer >= 1", getattr(run, key))
    if run.num_workers < 0:
        raise cfg.err("run.num_workers", "an integer >= 0", run.num_workers)
    if run.deepspeed is not None and not Path(run.deepspeed).is_file():
        shipped = Path(__file__).resolve().parent.parent / run.deepspeed  # "training/deepspeed/zero2.json" from anywhere
        if not shipped.is_file():
            raise cfg.err("run.deepspeed", "a DeepSpeed JSON file or null (plain PyTorch)", f"{run.deepspeed} (file not found)")
        run.deepspeed = str(shipped)
    if (model.preset is None) == (model.path is None):
        raise cfg.err("model", "exactly one of model.preset (a preset name) or model.path (a MoSE checkpoint directory)")
    from mose.config import DISPATCHES
    from training.stages import RECIPES

    if model.recipe not in RECIPES:
        raise cfg.err("model.recipe", f"one of {', '.join(RECIPES)}", model.recipe)
    if model.dispatch is not None and model.dispatch not in DISPATCHES:
        raise cfg.err("model.dispatch", f"one of {', '.join(DISPATCHES)}", model.dispatch)
    if not data.pool:
        raise cfg.err("data.pool", "a ScenePool directory")
    if data.max_length is not None and data.max_length < 8:
        raise cfg.err("data.max_length", "null or an integer >= 8", data.max_length)
    if data.max_images < 0:
        raise cfg.err("data.max_images", "an integer >= 0", data.max_images)
    for name, st in cfg.stages.items():
        k = f"stages.{name}"
        if not st.manifest and not data.manifests:
            raise cfg.err(f"{k}.manifest", "a manifest path (or data.manifests, a directory holding <stage>.jsonl)")
        if not st.trainable:
            raise cfg.err(f"{k}.trainable", f"a non-empty list of module groups from {', '.join(groups)}", st.trainable)
        bad = [g for g in st.trainable if g not in groups]
        if bad:
            raise cfg.err(f"{k}.trainable", f"module groups from {', '.join(groups)}", bad)
        if "lora" in st.trainable and st.lora is None:
            raise cfg.err(f"{k}.trainable", "'lora' only together with a stages.<name>.lora section")
        if not st.items.kinds or any(kd not in ITEM_KINDS for kd in st.items.kinds):
            raise cfg.err(f"{k}.items.kinds", f"a non-empty list from {', '.join(ITEM_KINDS)}", st.items.kinds)
        if st.sampler not in SAMPLERS:
            raise cfg.err(f"{k}.sampler", f"one of {', '.join(SAMPLERS)}", st.sampler)
        if st.lr_scheduler not in SCHEDULERS:
            raise cfg.err(f"{k}.lr_scheduler", f"one of {', '.join(SCHEDULERS)}", st.lr_scheduler)
        for key in ("batch_size", "grad_accum"):
            if getattr(st, key) < 1:
                raise cfg.err(f"{k}.{key}", "an integer >= 1", getattr(st, key))
        if st.max_steps is not None and st.max_steps < 1:
            raise cfg.err(f"{k}.max_steps", "null or an integer >= 1", st.max_steps)
        if not st.lr > 0:
            raise cfg.err(f"{k}.lr", "a learning rate > 0", st.lr)
        if not st.epochs > 0:
            raise cfg.err(f"{k}.epochs", "a number > 0", st.epochs)
        if not 0 <= st.warmup_ratio < 1:
            raise cfg.err(f"{k}.warmup_ratio", "a number in [0, 1)", st.warmup_ratio)
        if st.weight_decay < 0 or st.max_grad_norm < 0:
            raise cfg.err(f"{k}.weight_decay / max_grad_norm", "numbers >= 0")
        for term in ("lm", "balance", "z", "skill", "plan"):
            if getattr(st.losses, term) < 0:
                raise cfg.err(f"{k}.losses.{term}", "a weight >= 0", getattr(st.losses, term))
        if st.lora is not None:
            if st.lora.r < 1 or not st.lora.alpha > 0 or not 0 <= st.lora.dropout < 1 or not st.lora.targets:
                raise cfg.err(f"{k}.lora", "r >= 1, alpha > 0, 0 <= dropout < 1 and a non-empty targets list",
                              dataclasses.asdict(st.lora))
        if st.plan_refit is not None:
            pr = st.plan_refit
            if pr.steps < 0 or not pr.lr > 0 or pr.weight_decay < 0 or pr.batch_size < 1:
                raise cfg.err(f"{k}.plan_refit", "steps >= 0, lr > 0, weight_decay >= 0 and batch_size >= 1",
                              dataclasses.asdict(pr))
            if pr.steps and cfg.run.deepspeed and _zero_stage(cfg.run.deepspeed) == 3:
                raise cfg.err(f"{k}.plan_refit", "no refit under ZeRO-3 (the features are collected with the whole model on "
                              "each process); set steps: 0, or use ZeRO-2 or no DeepSpeed for this stage", cfg.run.deepspeed)


__all__ = ["ConfigError", "TrainConfig", "StageConfig", "LossConfig", "LoraConfig", "PlanRefitConfig", "ItemsConfig", "load_config", "from_dict",
           "STAGE_ORDER"]
