"""Stage checkpoints: where they are, which one to resume from, LoRA in and out, and the final safetensors export.

    <output_dir>/<stage>/checkpoint-<step>/   Trainer checkpoints (model safetensors, optimizer / DeepSpeed state, RNG,
                                              trainer_state.json written last: a directory without it is incomplete)
    <output_dir>/<stage>/final/               the stage's result: safetensors + config + processor +
                                              stage_summary.json; written to a temporary directory, then renamed

`final/` loads with plain transformers (`AutoModelForImageTextToText.from_pretrained(final)` after `import mose`, or
with `trust_remote_code=True` where this package is not installed: it holds the model code, mose/remote_code.py), no
DeepSpeed and no PEFT needed: LoRA adapters are merged into the attention weights (W + alpha/r * B A) first.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SUMMARY = "stage_summary.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(stage_dir: str | Path) -> Path | None:
    """The complete Trainer checkpoint with the highest step in `stage_dir` (None if there is none)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return None
    found = []
    for d in stage_dir.iterdir():
        m = _CKPT.match(d.name)
        if m and d.is_dir() and (d / "trainer_state.json").is_file():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def stage_done(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / "final" / SUMMARY).is_file()


# ----------------------------------------------------------------------------------------------
# LoRA


def lora_target_regex(targets: list[str]) -> str:
    """Attention projections of the text decoder only (the vision tower keeps its weights)."""
    names = "|".join(re.escape(t) for t in targets)
    return rf".*language_model\.layers\.\d+\.self_attn\.({names})"


def inject_lora(model, lora) -> int:
    """Add LoRA adapters (peft) in place to the decoder's attention projections; returns the number wrapped."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_target_regex(lora.targets),
                        bias="none")
    inject_adapter_in_model(config, model)
    n = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    if n == 0:
        raise ValueError(f"LoRA: no module matched targets {lora.targets} in the text decoder's attention layers")
    return n


def merge_lora_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA weights into their base layers: W = W_base + scaling * B @ A; plain transformers key names."""
    out: dict[str, torch.Tensor] = {}
    a_suffix = ".lora_A.default.weight"
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a = state[prefix + a_suffix]
                b = state[prefix + ".lora_B.default.weight"]
                delta = (b.float() @ a.float()) * scaling
                value = (value.float() + delta).to(value.dtype)
            out[f"{prefix}.{leaf}"] = value
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# the final export


def save_final(trainer, processor, final_dir: str | Path, summary: dict, lora=None) -> Path | None:
    """Write the stage's final model (safetensors), processor and summary. Call on every process (ZeRO-3 gathers)."""
    from common.atomic import atomic_dir

    engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(engine)  # ZeRO-3: gathered from every process
    model = trainer.accelerator.unwrap_model(trainer.model)
    final_dir = Path(final_dir)
    if trainer.args.should_save:
        if lora is not None:
            state = merge_lora_state_dict(state, lora.alpha / lora.r)
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        with atomic_dir(final_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if processor is not None:
                processor.save_pretrained(tmp)
            (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    trainer.accelerator.wait_for_everyone()
    return final_dir if trainer.args.should_save else None


__all__ = ["last_checkpoint", "stage_done", "inject_lora", "merge_lora_state_dict", "lora_target_regex", "save_final", "SUMMARY"]
