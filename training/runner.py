"""Run the configured stages in order: align -> router_pretrain -> skill_tune.

    cfg = load_config("training/configs/tiny.yaml")
    result = run_training(cfg)          # {"stages": {name: {"final": dir, "steps": n, "loss": x, ...}}}

Before any training: every stage's manifest, pool ids and items are checked and tokenised (training/data.py); each
stage's skill dataset is kept in `<run.output_dir>/skill_items/<stage>.jsonl` and reused while its inputs are unchanged.
The taxonomy (`data.taxonomy`, default the packaged one) is loaded once here and passed down as a `Taxonomy`.
Then, per stage: its model (the preset / checkpoint for the first stage, else the previous stage's `final/`),
LoRA if asked, the exact trainable set (printed as a parameter table), a `MoSETrainer` with the DeepSpeed config
(or plain PyTorch), resume from the stage's last complete checkpoint, and the final safetensors export. A stage
whose `final/` exists is skipped, so re-running the same command resumes an interrupted run.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch

from mose.skills import Taxonomy
from training.checkpoints import inject_lora, last_checkpoint, save_final, stage_done
from training.config import ConfigError, TrainConfig
from training.stages import STAGES, apply_trainable, recipe_groups, resolve_recipe


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def ensure_distributed_env() -> None:
    """A single process without a launcher: give DeepSpeed / torch.distributed a one-process world."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    if all(k in os.environ for k in keys):
        return  # a launcher (torchrun, deepspeed, accelerate) set the world up
    if os.environ.get("WORLD_SIZE", "1") != "1":
        missing = [k for k in keys if k not in os.environ]
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: start multi-process runs with a launcher")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    for k, v in defaults.items():  # keep what a partial environment already says, fill the rest
        os.environ.setdefault(k, v)


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and not torch.cuda.is_available():
        log("mose train: run.precision=bf16 without a GPU: training in bf16 on the CPU (slow; only fp32 is tested there)")
    return precision


def deepspeed_config(cfg: TrainConfig, hidden_size: int | None = None) -> dict | None:
    """The run's DeepSpeed JSON; the size-dependent "auto" buckets are filled from the text decoder's hidden size
    (the Trainer would look for `config.hidden_size`, which a VLM config nests in its text config)."""
    if cfg.run.deepspeed is None:
        return None
    with open(cfg.run.deepspeed) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg.source}: run.deepspeed: {cfg.run.deepspeed} is not valid JSON: {exc}") from None
    zero = ds.get("zero_optimization", {})
    if hidden_size is not None and isinstance(zero, dict):
        h = int(hidden_size)
        fill = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h}
        for key, value in fill.items():
            if zero.get(key) == "auto":
                zero[key] = value
    return ds


def training_arguments(cfg: TrainConfig, stage: str, stage_dir: Path, precision: str, model=None):
    from transformers import TrainingArguments

    st, run = cfg.stages[stage], cfg.run
    hidden = model.config.get_text_config(decoder=True).hidden_size if model is not None else None
    return TrainingArguments(
        output_dir=str(stage_dir), per_device_train_batch_size=st.batch_size, gradient_accumulation_steps=st.grad_accum,
        learning_rate=st.lr, weight_decay=st.weight_decay, num_train_epochs=st.epochs, max_steps=st.max_steps or -1,
        warmup_steps=st.warmup_ratio, lr_scheduler_type=st.lr_scheduler, max_grad_norm=st.max_grad_norm,
        logging_steps=run.logging_steps, save_strategy="steps", save_steps=run.save_steps, save_total_limit=run.save_total_limit,
        report_to="none", disable_tqdm=True, seed=run.seed, data_seed=run.seed, bf16=precision == "bf16",
        activation_checkpointing=run.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=deepspeed_config(cfg, hidden), use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        dataloader_num_workers=run.num_workers, ddp_find_unused_parameters=False, label_names=["labels"],
    )


def _release(trainer) -> None:
    """Free one stage's engine so the next stage (maybe another ZeRO stage) starts clean."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    engine = getattr(trainer, "model_wrapped", None)
    if trainer.is_deepspeed_enabled and hasattr(engine, "destroy"):
        engine.destroy()
    trainer.accelerator.free_memory()
    unset_hf_deepspeed_config()  # else the next from_pretrained would build the model partitioned (zero.Init)
    gc.collect()


def run_stage(cfg: TrainConfig, stage: str, model, processor, data, taxonomy: Taxonomy, *, recipe: str = "pretrained", callbacks=(),
              progress: bool = True) -> dict:
    """Train one stage. `recipe` (resolved: "pretrained" or "from_scratch", training.stages.resolve_recipe) decides
    whether the whole language model trains too."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from mose.skill_data import SkillCollator
    from training.callbacks import JsonlTensorBoardLogger, ProgressBar
    from training.data import make_sampler
    from training.trainer import MoSETrainer, stage_loss_weights

    st = cfg.stages[stage]
    out = Path(cfg.run.output_dir)
    stage_dir = out / stage
    if st.lora is not None:
        n = inject_lora(model, st.lora)
        log(f"[{stage}] LoRA r={st.lora.r} alpha={st.lora.alpha} on {n} attention projections")
    groups = recipe_groups(st.trainable, recipe) + (["lora"] if st.lora is not None and "lora" not in st.trainable else [])
    head = getattr(model.config, "trajectory_decoder", "text") == "head"
    if head and st.losses.plan > 0 and "plan_head" not in groups:  # the planning head trains wherever its loss counts
        groups.append("plan_head")
    table = apply_trainable(model, groups)
    why = {"from_scratch": "the base has no pretrained weights: the whole language model trains in every stage",
           "pretrained": "each stage trains its own groups"}[recipe]
    log(table.format(f"[{stage}] {STAGES[stage].description}\n[{stage}] recipe: {recipe} ({why})\n"
                     f"[{stage}] parameters (trainable groups: {', '.join(groups)}):"))
    precision = resolve_precision(cfg.run.precision)
    args = training_arguments(cfg, stage, stage_dir, precision, model)
    trainer = MoSETrainer(model=model, args=args, train_dataset=data.dataset, data_collator=SkillCollator(processor, plan=head),
                          lm_weight=st.losses.lm, train_sampler=make_sampler(st, data, taxonomy, cfg.run.seed))
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(JsonlTensorBoardLogger(trainer, stage, stage_dir / "log.jsonl", out / "tensorboard" / stage))
    trainer.add_callback(ProgressBar(stage, enabled=progress and cfg.run.progress))
    for cb in callbacks:
        trainer.add_callback(cb)
    resume = last_checkpoint(stage_dir)
    if resume is not None:
        log(f"[{stage}] resuming from {resume}")
    try:
        with stage_loss_weights(model, st.losses):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            refit = refit_plan_head(model, st, data.dataset, processor, stage) if head else None
            logs = [h for h in trainer.state.log_history if "loss" in h]
            summary = {
                "stage": stage, "steps": trainer.state.global_step, "train_loss": result.training_loss,
                "last_loss": logs[-1]["loss"] if logs else None, "resumed_from": str(resume) if resume else None,
                "precision": precision, "deepspeed": cfg.run.deepspeed, "world_size": trainer.args.world_size, "trainable": table.rows, "trainable_groups": groups, "recipe": recipe,
                "lora": None if st.lora is None else vars(st.lora), "losses": vars(st.losses), "manifest": str(data.manifest),
                "scenes": len(data.scene_ids), "items": len(data), "data_report": data.report, "plan_refit": refit,
            }
            save_final(trainer, processor, stage_dir / "final", summary, lora=st.lora)
    finally:
        _release(trainer)
    log(f"[{stage}] done: {summary['steps']} steps, last logged loss {summary['last_loss']}; final model -> {stage_dir / 'final'}")
    return summary


def refit_plan_head(model, st, dataset, processor, stage: str) -> dict | None:
    """The stage's `plan_refit` (mose/plan_head_fit.py): the planning head alone, full batch, on frozen features of
    the stage's items. None when the stage has none (or 0 steps) or its plan loss is off."""
    from mose.plan_head_fit import fit_plan_head, plan_inputs
    from mose.skill_data import SkillCollator

    pr = st.plan_refit
    if pr is None or pr.steps == 0 or st.losses.plan <= 0:
        return None
    try:
        features, prior, targets = plan_inputs(model, dataset, SkillCollator(processor, plan=True), batch_size=pr.batch_size)
    except ValueError as exc:  # e.g. a QA-only stage: nothing to refit on; the trained stage is kept either way
        log(f"[{stage}] WARNING: stages.{stage}.plan_refit skipped: {exc}")
        return {"skipped": str(exc)}
    stats = fit_plan_head(model.plan_head, features, prior, targets, steps=pr.steps, lr=pr.lr, weight_decay=pr.weight_decay)
    log(f"[{stage}] planning head refit on {stats['items']} items, {pr.steps} full-batch steps: "
        f"loss {stats['loss_before']:.4f} -> {stats['loss_after']:.4f}")
    return stats


def preflight(cfg: TrainConfig, names: list[str], model) -> None:
    """Checks of every stage to run against the model's structure, before any of them trains."""
    import re

    from training.checkpoints import lora_target_regex
    from training.stages import param_group

    present = {param_group(n) for n, _ in model.named_parameters()}
    modules = [n for n, _ in model.named_modules()]
    for s in names:
        st = cfg.stages[s]
        if not set(st.trainable) & (present | {"lora"}):
            raise ConfigError(f"{cfg.source}: stages.{s}.trainable: {st.trainable} names no module group this model has "
                              f"({', '.join(sorted(present))})")
        if st.losses.skill > 0 and not model.config.skill_groups:
            raise ConfigError(f"{cfg.source}: stages.{s}.losses.skill: > 0 but the model has no skill_groups (skill -> experts map)")
        if st.lora is not None:
            rx = re.compile(lora_target_regex(st.lora.targets))
            if not any(rx.fullmatch(n) for n in modules):
                raise ConfigError(f"{cfg.source}: stages.{s}.lora.targets: {st.lora.targets} match no attention projection of the "
                                  "text decoder (language_model.layers.N.self_attn.<name>)")


def run_training(cfg: TrainConfig, *, stages: list[str] | None = None, fresh: bool = False, callbacks=(), progress: bool = True) -> dict:
    """Check everything, then train the stages in order. Returns {"stages": {name: summary}, "final": dir}."""
    from mose.skills import load_taxonomy
    from training.data import collect_stage_items, tokenise_stages
    from training.model_setup import initial_model, initial_processor, stage_model, starts_from_random_init

    names = cfg.stage_names()
    if stages:
        bad = [s for s in stages if s not in names]
        if bad:
            raise ConfigError(f"--stages {bad}: not in {cfg.source}'s stages {names}")
        names = [s for s in names if s in stages]
    out = Path(cfg.run.output_dir)
    if cfg.run.deepspeed:
        ensure_distributed_env()
    from accelerate import PartialState

    state = PartialState()  # under a launcher: the process group; the main process prepares, the others then reuse
    taxonomy = load_taxonomy(cfg.data.taxonomy)
    recipe = resolve_recipe(cfg.model.recipe, random_init=starts_from_random_init(cfg))
    processor_dir = out / "processor"
    with state.main_process_first():
        if fresh and state.is_main_process:
            for s in names:
                shutil.rmtree(out / s, ignore_errors=True)
                shutil.rmtree(out / "tensorboard" / s, ignore_errors=True)
        data = collect_stage_items(cfg, taxonomy, log=log)  # every manifest / pool / item check, before any training
        processor = initial_processor(cfg, {s: d.dataset for s, d in data.items()}, processor_dir)
        if state.is_main_process:
            from common.atomic import atomic_dir, write_json

            out.mkdir(parents=True, exist_ok=True)
            if not processor_dir.is_dir():
                with atomic_dir(processor_dir) as tmp:
                    processor.save_pretrained(tmp)
            write_json(out / "train_config.json", cfg.as_dict() | {"source": cfg.source})
        tokenise_stages(cfg, data, processor, taxonomy, cache_dir=out / "cache")
    results: dict[str, dict] = {}
    all_names = cfg.stage_names()
    prev_final = None
    for s in all_names[: all_names.index(names[0])]:  # stages before the first one asked for must be done
        if not stage_done(out / s):
            raise ConfigError(f"--stages: stage {s!r} comes before {names[0]!r} and has no final checkpoint in {out / s}; run it first")
        prev_final = out / s / "final"
    checked = False
    for s in names:
        if stage_done(out / s):
            log(f"[{s}] already done ({out / s / 'final'}); skipping")
            results[s] = json.loads((out / s / "final" / "stage_summary.json").read_text())
            prev_final = out / s / "final"
            continue
        # Every process builds the whole model; DeepSpeed partitions it when the Trainer initialises the engine (ZeRO-3).
        # Not built inside deepspeed.zero.Init: transformers 5 loads a MoSE checkpoint there correctly, but its
        # save_pretrained then writes the text decoder under wrong key names (checked), so exports would not load.
        model = stage_model(prev_final, cfg.model.dispatch) if prev_final is not None else initial_model(cfg, taxonomy, processor)
        if not checked:
            preflight(cfg, [n for n in names if not stage_done(out / n)], model)
            checked = True
        results[s] = run_stage(cfg, s, model, processor, data[s], taxonomy, recipe=recipe, callbacks=callbacks, progress=progress)
        prev_final = out / s / "final"
        del model
    return {"stages": results, "final": str(prev_final) if prev_final else None}


__all__ = ["run_training", "run_stage", "training_arguments", "ensure_distributed_env"]
