"""Training logs a person can open: JSONL rows and TensorBoard scalars per stage, and a progress bar with tokens/s.

JSONL (`<output_dir>/<stage>/log.jsonl`), one row per logging step::

    {"stage": "skill_tune", "step": 12, "epoch": 0.5, "loss": 3.1, "lm_loss": 3.0, "aux_loss": 0.12, "grad_norm": 0.8,
     "learning_rate": 2e-05, "tokens": 4096, "tokens_per_s": 850.0,
     "router": {"layers": [0, 2], "balance": [1.02, 1.10], "entropy_norm": [0.97, 0.91], "skill_accuracy": [0.61, 0.55],
                "expert_load": [[0.26, 0.24, ...], ...], "z_loss": [...], "skill_loss": [...], "entropy": [...]}}

TensorBoard (`<output_dir>/tensorboard/<stage>`): every scalar of the logs (`router/<stat>/layer_<i>` and
`router/<stat>/mean`, expert loads per layer and expert). On resume, rows and events after the checkpoint's
step are dropped, so a resumed stage's log reads as one run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from common.atomic import write_text

_SKIP = {"total_flos"}


class JsonlTensorBoardLogger(TrainerCallback):
    """Writes each log of the main process as a JSONL row and as TensorBoard scalars."""

    def __init__(self, trainer, stage: str, jsonl_path: str | Path, tb_dir: str | Path | None):
        self.trainer, self.stage = trainer, stage
        self.jsonl_path, self.tb_dir = Path(jsonl_path), Path(tb_dir) if tb_dir else None
        self.writer = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.jsonl_path, state.global_step)
        if self.tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after the checkpoint we resume from
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=state.global_step + 1 if state.global_step else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"stage": self.stage, "step": state.global_step}
        for k, v in logs.items():
            if k in _SKIP or k.startswith("router/"):
                continue
            row[k] = _clean(v)
        if "loss" in logs and self.trainer.last_router_log:
            row["router"] = self.trainer.last_router_log
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in logs.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _SKIP and math.isfinite(v):
                    tag = k if "/" in k else f"train/{k}"
                    self.writer.add_scalar(tag, v, state.global_step)
            self.writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only rows with step <= last_step (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:  # a row cut by a kill: drop it
            continue
    if len(keep) != len(lines):
        write_text(path, "".join(x + "\n" for x in keep))


class ProgressBar(TrainerCallback):
    """A tqdm bar per stage on the main process: steps, loss, tokens/s, routing balance and skill accuracy."""

    def __init__(self, stage: str, enabled: bool = True):
        self.stage, self.enabled = stage, enabled
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        p = {"loss": f"{logs['loss']:.3f}"}
        if "tokens_per_s" in logs:
            p["tok/s"] = f"{logs['tokens_per_s']:.0f}"
        if "router/balance/mean" in logs:
            p["balance"] = f"{logs['router/balance/mean']:.2f}"
        if "router/skill_accuracy/mean" in logs:
            p["skill_acc"] = f"{logs['router/skill_accuracy/mean']:.2f}"
        self.bar.set_postfix(p, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["JsonlTensorBoardLogger", "ProgressBar", "truncate_jsonl"]
