"""The three training stages: what trains, on which items, with which losses.

    align            projector only, on perception QA (vision tower and LLM frozen); LM loss only
    router_pretrain  routers (optionally experts), on the hierarchical step-by-step items, skill-balanced;
                     LM + balance + z + the hierarchical skill loss (weight 1)
    skill_tune       experts + routers (+ LoRA on attention, optional), on the curated instruction mixture
                     (hierarchical + single QA items); LM + balance + z + skill loss

Parameters are sorted into module groups by name (`param_group`); a stage's `trainable` list names groups.
`apply_trainable` sets `requires_grad` exactly and returns the parameter table printed at each stage's start.
MoE-LLaVA's stages for comparison: projector (lr 1e-3), full LLM (2e-5), experts + router (2e-5).

The recipe (`model.recipe`, resolved by `resolve_recipe`). These stages assume a pretrained base: its embeddings,
attention, dense FFNs, norms and output head already work, and each stage moves only its own groups. A random-init
base (the tiny preset) has none of that: under the stage groups alone, about 1.8M of its 4.3M parameters never leave
random init and it cannot learn to answer. So a base without pretrained weights trains with the "from_scratch"
recipe: every stage trains its own groups plus the whole language model and the projector (`FROM_SCRATCH_GROUPS`;
the vision tower stays frozen: random features are still a fixed projection of the image). Our choice; the MoSE
paper starts from a pretrained VLM and says nothing about random init.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

GROUPS = ("vision_tower", "projector", "embeddings", "attention", "dense_ffn", "router", "experts", "shared_expert", "norms",
          "lm_head", "lora", "plan_head", "other")


RECIPES = ("auto", "pretrained", "from_scratch")
FROM_SCRATCH_GROUPS = ("projector", "embeddings", "attention", "dense_ffn", "router", "experts", "shared_expert", "norms", "lm_head")


def resolve_recipe(recipe: str, *, random_init: bool) -> str:
    """"pretrained" or "from_scratch": `recipe` itself, or for "auto" from_scratch exactly when the base is random init."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe == "auto":
        return "from_scratch" if random_init else "pretrained"
    return recipe


def recipe_groups(groups, recipe: str) -> list[str]:
    """A stage's trainable groups under a resolved recipe: its own, plus FROM_SCRATCH_GROUPS for from_scratch (in GROUPS order)."""
    wanted = set(groups) | (set(FROM_SCRATCH_GROUPS) if recipe == "from_scratch" else set())
    return [g for g in GROUPS if g in wanted]


@dataclass(frozen=True)
class StageSpec:
    name: str
    description: str
    trainable: tuple[str, ...]
    kinds: tuple[str, ...]
    roots: tuple[str, ...] | None
    losses: dict
    lr: float
    sampler: str
    extra: dict = field(default_factory=dict)

    def defaults(self) -> dict:
        """The stage's config defaults (merged under the YAML's stage section by training.config)."""
        return {"trainable": list(self.trainable), "items": {"kinds": list(self.kinds), "roots": list(self.roots) if self.roots else None},
                "losses": dict(self.losses), "lr": self.lr, "sampler": self.sampler, **self.extra}


STAGES = {
    "align": StageSpec(
        "align", "vision-language alignment: the projector learns to map image features into the LLM's space",
        trainable=("projector",), kinds=("single",), roots=("perception",),
        losses={"lm": 1.0, "balance": 0.0, "z": 0.0, "skill": 0.0}, lr=1e-3, sampler="shuffle"),
    "router_pretrain": StageSpec(
        "router_pretrain", "router pretraining: routers learn to send each skill's tokens to its expert group",
        trainable=("router",), kinds=("hierarchical",), roots=None,
        losses={"lm": 1.0, "balance": 0.01, "z": 0.001, "skill": 1.0}, lr=1e-3, sampler="skill_balanced"),
    "skill_tune": StageSpec(
        "skill_tune", "skill tuning: experts and routers on the curated instruction mixture",
        trainable=("router", "experts", "shared_expert"), kinds=("hierarchical", "single"), roots=None,
        losses={"lm": 1.0, "balance": 0.01, "z": 0.001, "skill": 0.1}, lr=2e-5, sampler="shuffle"),
}


def param_group(name: str) -> str:
    """The module group of a parameter of a MoSE model (LLaVA-style or Qwen2-VL), from its qualified name."""
    if "lora_" in name:
        return "lora"
    if name.startswith("plan_head.") or ".plan_head." in name:  # the "head" trajectory decoder's MLP
        return "plan_head"
    if ".router." in name:
        return "router"
    if ".experts." in name:
        return "experts"
    if ".shared_expert." in name:
        return "shared_expert"
    if "multi_modal_projector" in name or ".visual.merger." in name:
        return "projector"
    if "vision_tower" in name or ".visual." in name:
        return "vision_tower"
    if "lm_head" in name:
        return "lm_head"
    if "embed_tokens" in name:
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_ffn"
    if "norm" in name:
        return "norms"
    return "other"


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitioned parameters report 0 elements


@dataclass
class ParamTable:
    """Per module group: total and trainable parameter counts."""

    rows: dict  # group -> (params, trainable params)

    @property
    def total(self) -> int:
        return sum(r[0] for r in self.rows.values())

    @property
    def trainable(self) -> int:
        return sum(r[1] for r in self.rows.values())

    def trainable_groups(self) -> list[str]:
        return [g for g, (_, t) in self.rows.items() if t]

    def format(self, title: str = "") -> str:
        lines = [title] if title else []
        lines.append(f"  {'module group':<14} {'params':>14} {'trainable':>14}  ")
        for g, (n, t) in self.rows.items():
            flag = "yes" if t == n else ("no" if t == 0 else "partial")
            lines.append(f"  {g:<14} {n:>14,} {t:>14,}  {flag}")
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"  {'total':<14} {self.total:>14,} {self.trainable:>14,}  ({pct:.2f} % trainable)")
        return "\n".join(lines)


def param_table(model: nn.Module) -> ParamTable:
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        r = rows.setdefault(param_group(name), [0, 0])
        r[0] += _numel(p)
        r[1] += _numel(p) if p.requires_grad else 0
    return ParamTable({g: tuple(rows[g]) for g in GROUPS if g in rows})


def apply_trainable(model: nn.Module, groups) -> ParamTable:
    """Set `requires_grad` to True exactly for the parameters of `groups`; return the parameter table.

    A group the model does not have (e.g. "shared_expert" without a shared expert) trains nothing; ValueError when
    no parameter at all would train.
    """
    wanted = set(groups)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown module groups {sorted(unknown)}; expected some of {', '.join(GROUPS)}")
    for name, p in model.named_parameters():
        p.requires_grad_(param_group(name) in wanted)
    table = param_table(model)
    if not table.trainable:
        raise ValueError(f"no parameter of the model belongs to the trainable groups {sorted(wanted)}; the model has "
                         f"{', '.join(table.rows)}")
    return table


__all__ = ["GROUPS", "STAGES", "StageSpec", "param_group", "param_table", "apply_trainable", "ParamTable", "RECIPES", "FROM_SCRATCH_GROUPS",
           "resolve_recipe", "recipe_groups"]
