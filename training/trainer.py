"""`MoSETrainer`: the Hugging Face Trainer with MoSE's routing losses, per-layer routing statistics and tokens/s.

The loss of a micro-batch is `lm * LM loss + aux_loss`, where the model computes `aux_loss` from the stage's
balance / z / skill weights (set on `model.config` for the stage by `stage_loss_weights`). Per MoE layer, the
router statistics the model returns (balance, z-loss, entropy, skill loss, skill routing accuracy, expert load)
are averaged over the micro-batches of a logging interval (and over processes) and added to the logs, per layer
and as the mean over layers, never as a sum over layers. DeepSpeed (ZeRO-2 / ZeRO-3), plain PyTorch, CPU and
GPU all go through this same class; the engine is the Trainer's (`TrainingArguments.deepspeed`).

With `MoSEConfig.balancing == "aux_free"` the trainer adds `AuxFreeBiasCallback`: at the end of every optimizer
step (`on_step_end`, i.e. after the gradient-accumulation boundary, not per micro-batch) it moves each router's
per-expert selection bias from the expert loads of all the step's micro-batches, summed over processes
(`mose.moe.update_aux_free_bias`), so under data parallel / ZeRO every rank keeps the same bias.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from mose.moe import update_aux_free_bias

STAT_KEYS = ("balance", "z_loss", "entropy", "skill_loss", "skill_accuracy")


@contextlib.contextmanager
def stage_loss_weights(model, losses):
    """Set the model's routing loss coefficients to a stage's weights (balance, z, skill) for the duration."""
    cfg = model.config
    keys = {"router_balance_coef": losses.balance, "router_z_loss_coef": losses.z, "skill_loss_coef": losses.skill}
    if getattr(cfg, "trajectory_decoder", "text") == "head":
        keys["plan_loss_coef"] = getattr(losses, "plan", 1.0)
    old = {k: getattr(cfg, k) for k in keys}
    for k, v in keys.items():
        setattr(cfg, k, float(v))
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(cfg, k, v)


class RoutingStats:
    """Sums of per-layer router statistics and token counts over one logging interval."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.tokens = 0
        self.lm_loss = 0.0
        self.aux_loss = 0.0
        self.plan_loss = 0.0
        self.plan_batches = 0
        self.layers: list[int] | None = None
        self.t0 = time.perf_counter()

    def add(self, outputs, tokens: int) -> None:
        stats = outputs.router_stats or {}
        for k in (*STAT_KEYS, "expert_load"):
            if k in stats:
                v = stats[k].detach().float().cpu()
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        if "layers" in stats:
            self.layers = [int(x) for x in stats["layers"].tolist()]
        if outputs.lm_loss is not None:
            self.lm_loss += float(outputs.lm_loss.detach())
        if outputs.aux_loss is not None:
            self.aux_loss += float(outputs.aux_loss.detach())
        if getattr(outputs, "plan_loss", None) is not None:
            self.plan_loss += float(outputs.plan_loss.detach())
            self.plan_batches += 1
        self.batches += 1
        self.tokens += int(tokens)

    def reduce(self) -> dict:
        """Means over the interval's micro-batches and all processes; tokens summed over processes."""
        keys = sorted(self.sums)
        flat = [self.sums[k].reshape(-1) for k in keys]
        head = torch.tensor([self.batches, self.tokens, self.lm_loss, self.aux_loss], dtype=torch.float64)
        vec = torch.cat([head] + [f.double() for f in flat])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            backend = torch.distributed.get_backend()
            dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            vec = vec.to(dev)
            torch.distributed.all_reduce(vec)
            vec = vec.cpu()
        batches, tokens = max(float(vec[0]), 1.0), int(vec[1])
        out = {"tokens": tokens, "lm_loss": float(vec[2]) / batches, "aux_loss": float(vec[3]) / batches, "stats": {}}
        pos = 4
        for k, f in zip(keys, flat):
            out["stats"][k] = (vec[pos : pos + f.numel()] / batches).reshape(self.sums[k].shape)
            pos += f.numel()
        return out


class AuxFreeBiasCallback(TrainerCallback):
    """Aux-loss-free balancing: one bias update per optimizer step (DeepSeek-V3 Sec. 2.1.2), outside the gradient."""

    def __init__(self, model):
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):
        update_aux_free_bias(self.model, float(self.model.config.aux_free_rate))
        return control


class MoSETrainer(Trainer):
    """Trainer for one MoSE stage. Extra arguments: `lm_weight` (weight of the LM loss), `train_sampler` (optional)."""

    def __init__(self, *args, lm_weight: float = 1.0, train_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lm_weight = float(lm_weight)
        self.train_sampler = train_sampler
        self.routing = RoutingStats()
        self.last_router_log: dict | None = None  # structured per-layer stats of the last log (read by the JSONL logger)
        # the LM loss is a mean per micro-batch; the Trainer divides by gradient accumulation itself
        self.model_accepts_loss_kwargs = False
        if getattr(self.model.config, "balancing", "aux_loss") == "aux_free":
            self.add_callback(AuxFreeBiasCallback(self.model))

    def _get_train_sampler(self, train_dataset=None):
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if outputs.lm_loss is not None:
            loss = self.lm_weight * outputs.lm_loss + outputs.aux_loss.to(outputs.lm_loss.dtype)
            plan = getattr(outputs, "plan_loss", None)
            if plan is not None:  # "head" decoder only (mose/trajectory_decoders.py); text batches never carry it
                # self.model: under DeepSpeed `model` is the engine, whose `.config` is its own JSON dict
                loss = loss + self.model.config.plan_loss_coef * plan.to(loss.dtype)
        else:
            loss = outputs.loss
        if loss is None:
            raise ValueError("MoSETrainer: the batch has neither labels nor skill_labels; nothing to train on")
        if model.training:
            mask = inputs.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            self.routing.add(outputs, tokens)
        return (loss, outputs) if return_outputs else loss

    # ---- checkpoints: module names as they are, so a resume loads every weight back ------------------------------
    # (transformers 5's save_pretrained rewrites LLaVA / Qwen2-VL keys into the hub layout, and the Trainer's own
    # resume loads them with load_state_dict(strict=False): nothing would match and training would silently restart
    # from the stage's initial weights. The stage's final export still goes through save_pretrained.)
    def _save(self, output_dir: str | None = None, state_dict=None):
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        state = state_dict if state_dict is not None else model.state_dict()
        save_file(unique_tensors(state), os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt", "layout": "module"})
        model.config.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        model = model if model is not None else self.model
        path = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{resume_from_checkpoint}: no model.safetensors to resume from")
        state = load_file(path, device="cpu")
        result = model.load_state_dict(state, strict=False)
        own = model.state_dict()
        tied = {k for k in result.missing_keys if any(own[k].data_ptr() == own[j].data_ptr() for j in state if j in own)}
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(f"{path}: does not match the model: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.routing.batches:
            seconds = max(time.perf_counter() - self.routing.t0, 1e-9)
            red = self.routing.reduce()
            logs["lm_loss"] = red["lm_loss"]
            logs["aux_loss"] = red["aux_loss"]
            if self.routing.plan_batches:  # this process's mean over the interval ("head" decoder only)
                logs["plan_loss"] = self.routing.plan_loss / self.routing.plan_batches
            logs["tokens"] = red["tokens"]
            logs["tokens_per_s"] = red["tokens"] / seconds
            logs.update(flat_router_logs(red["stats"], self.routing.layers))
            self.last_router_log = structured_router_log(red["stats"], self.routing.layers)
            self.routing.reset()
        super().log(logs, start_time)


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies for safetensors, one per storage (tied weights, e.g. embeddings and LM head, are kept once)."""
    out, seen = {}, set()
    for k, v in state.items():
        key = (v.device, v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def structured_router_log(stats: dict, layers: list[int] | None) -> dict:
    """Per-layer lists (JSONL): layers, balance, z_loss, entropy, entropy_norm, skill_loss, skill_accuracy, expert_load."""
    if not stats:
        return {}
    out: dict = {"layers": list(layers or [])}
    for k in STAT_KEYS:
        if k in stats:
            out[k] = [round(float(v), 6) for v in stats[k]]
    if "expert_load" in stats:
        load = stats["expert_load"]
        out["expert_load"] = [[round(float(v), 6) for v in row] for row in load]
        if "entropy" in stats:  # 1.0 = uniform over the experts, 0.0 = one expert
            out["entropy_norm"] = [round(float(v) / math.log(load.shape[-1]), 6) if load.shape[-1] > 1 else 0.0 for v in stats["entropy"]]
    return out


def flat_router_logs(stats: dict, layers: list[int] | None, prefix: str = "router") -> dict[str, float]:
    """Scalars for TensorBoard / the progress bar: `router/<stat>/layer_<i>` and `router/<stat>/mean` (never a sum)."""
    s = structured_router_log(stats, layers)
    logs: dict[str, float] = {}
    names = s.get("layers", [])
    for k in (*STAT_KEYS, "entropy_norm"):
        if k not in s:
            continue
        logs[f"{prefix}/{k}/mean"] = sum(s[k]) / max(len(s[k]), 1)
        for layer, v in zip(names, s[k]):
            logs[f"{prefix}/{k}/layer_{layer}"] = v
    for layer, row in zip(names, s.get("expert_load", [])):
        # max share relative to the uniform share: 1.0 = even load, E = everything on one expert
        logs[f"{prefix}/expert_load_max/layer_{layer}"] = max(row) * len(row)
        for e, v in enumerate(row):
            logs[f"{prefix}/expert_load/layer_{layer}/expert_{e}"] = v
    return logs


__all__ = ["AuxFreeBiasCallback", "MoSETrainer", "RoutingStats", "stage_loss_weights", "flat_router_logs", "structured_router_log"]
