"""MoSE configuration: a base Hugging Face VLM config plus the sparse-expert options.

`MoSEConfig` nests the base VLM's config (`base_config`, e.g. a `LlavaConfig` or `Qwen2VLConfig`) and adds how many
experts each chosen decoder FFN becomes, how tokens are routed to them, and which expert group serves which skill.
Everything is validated here, at the boundary, so a bad option fails before any weight is built or touched.
"""
from __future__ import annotations

import sys

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# base model_type -> text model_types allowed inside it (None: the text model is fixed by the base type)
SUPPORTED_BASES: dict[str, tuple[str, ...] | None] = {
    "llava": ("llama", "qwen2", "qwen3"),
    "qwen2_vl": None,
    "qwen2_5_vl": None,
}
PLACEMENTS = ("all", "every_other", "first_half", "second_half")
DISPATCHES = ("auto", "grouped_mm", "sort", "eager")


def check_base_config(base_config: PretrainedConfig) -> None:
    """Raise a clear `ValueError` unless `base_config` is a VLM whose text decoder MoSE can upcycle."""
    model_type = getattr(base_config, "model_type", None)
    if model_type not in SUPPORTED_BASES:
        raise ValueError(
            f"MoSE: unsupported base architecture model_type={model_type!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_BASES))} (LLaVA-style with a "
            f"{'/'.join(SUPPORTED_BASES['llava'])} text model, Qwen2-VL, Qwen2.5-VL)."
        )
    allowed_text = SUPPORTED_BASES[model_type]
    text_type = getattr(getattr(base_config, "text_config", None), "model_type", None)
    if allowed_text is not None and text_type not in allowed_text:
        raise ValueError(
            f"MoSE: unsupported text model {text_type!r} inside a {model_type!r} base; "
            f"supported text models: {', '.join(allowed_text)}."
        )
    text = base_config.get_text_config(decoder=True)
    if getattr(text, "mlp_bias", False):
        raise ValueError("MoSE: the base text model uses FFN biases (mlp_bias=True); MoSE experts have no bias.")


def resolve_moe_layers(moe_layers: str | list[int], num_layers: int) -> list[int]:
    """Decoder layer indices that become MoE, from a placement name or an explicit list."""
    if isinstance(moe_layers, str):
        if moe_layers == "all":
            return list(range(num_layers))
        if moe_layers == "every_other":  # MoE-LLaVA's placement: layers 0, 2, 4, ...
            return list(range(0, num_layers, 2))
        if moe_layers == "first_half":
            return list(range(num_layers // 2))
        if moe_layers == "second_half":
            return list(range(num_layers // 2, num_layers))
        raise ValueError(f"MoSEConfig.moe_layers: unknown placement {moe_layers!r}; expected one of {PLACEMENTS} or a list of layer indices.")
    layers = [int(i) for i in moe_layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"MoSEConfig.moe_layers: layer indices {bad} out of range; the base text model has {num_layers} decoder layers (0..{num_layers - 1}).")
    if len(set(layers)) != len(layers) or not layers:
        raise ValueError(f"MoSEConfig.moe_layers: expected a non-empty list of distinct layer indices, got {layers}.")
    return sorted(layers)


def _config_tree(config: PretrainedConfig) -> list[PretrainedConfig]:
    """A config and, recursively, its sub-configs."""
    out = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig):
            out.extend(_config_tree(sub))
    return out


class MoSEConfig(PretrainedConfig):
    r"""
    Configuration of a MoSE (skill-routed sparse mixture-of-experts) VLM.

    Args:
        base_config (`dict` or `PretrainedConfig`): config of the base VLM (`llava` with a Llama/Qwen2/Qwen3 text model,
            `qwen2_vl` or `qwen2_5_vl`). A dict needs a `model_type`.
        num_experts (`int`): routed experts per MoE layer.
        num_experts_per_tok (`int`): k, the experts each token is sent to (weights renormalised over the k chosen);
            `top_k=` is accepted as an alias (not stored under that name: it would read as a sampling option).
        moe_layers (`str` or `list[int]`): "all", "every_other" (0, 2, 4, ...), "first_half", "second_half" or explicit
            decoder layer indices.
        expert_intermediate_size (`int`, *optional*): FFN width of each expert; `None` = the base FFN width (needed
            for upcycling).
        shared_expert (`bool`): add an always-on expert next to the routed ones (outputs are summed).
        router_jitter (`float`): multiplicative input noise U(1-eps, 1+eps) on the router input during training.
        router_z_loss_coef, router_balance_coef, skill_loss_coef (`float`): weights of the routing losses in `aux_loss`.
        skill_groups (`dict[str, list[int]]`, *optional*): skill name -> expert indices serving it. Skill id `i` in
            per-token `skill_labels` is the i-th key. Coarse skills (perception / prediction / planning) and fine skills
            live in the same map.
        skill_parents (`dict[str, str]`, *optional*): fine skill -> its coarse parent (both keys of `skill_groups`).
        skill_order (`list[str]`, *optional*): the skill names in skill-id order. Filled in from `skill_groups` and
            written to config.json, whose keys transformers sorts; on load, `skill_groups` is put back in this order so
            skill id `i` keeps its expert group across save / load.
        dispatch (`str`): expert dispatch: "grouped_mm" (torch grouped matrix multiply over expert-sorted tokens),
            "sort" (the same sorted layout, experts run in parallel on CPU threads, one matmul per expert segment),
            "eager" (reference loop) or "auto" (grouped_mm on GPU; on CPU sort for large batches, grouped_mm for small).
        capacity_factor (`float`, *optional*): `None` = dropless; else, in training, each expert keeps at most
            ceil(tokens * top_k / num_experts * capacity_factor) token choices, top-1 choices first, then in token
            order; dropped choices contribute nothing (see `mose.expert_dispatch.DispatchPlan`). Evaluation and generation are
            always dropless.
        trajectory_decoder (`str`): where the planned poses come from (mose/trajectory_decoders.py): "text" (the
            answer's `[trajectory]` decimals; no extra weights) or "head" (a `plan_head` MLP on the last hidden state
            at the last prompt token predicts a residual to a constant-velocity prior from the `ego_speed` input).
        balancing (`str`): how expert load is balanced: "aux_loss" (the balance loss only, weighted by
            `router_balance_coef`) or "aux_free" (DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias on
            the top-k selection only, updated once per optimizer step from the step's expert loads; see
            `mose.moe.MoSERouter` / `update_aux_free_bias`). "aux_free" leaves `router_balance_coef` as configured
            (DeepSeek-V3 keeps a tiny sequence-wise loss, alpha = 1e-4; set the stage's `losses.balance` to 0 for
            pure aux-free balancing).
        aux_free_rate (`float`): the bias update speed gamma of "aux_free" (DeepSeek-V3: 0.001).
        plan_loss_coef (`float`): weight of the planning head's loss in `loss` ("head" only; set per stage from
            `losses.plan` by the trainer).
    """

    model_type = "mose"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llava")}

    base_config: dict | PretrainedConfig | None = None
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: str | list[int] = "every_other"
    expert_intermediate_size: int | None = None
    shared_expert: bool = False
    router_jitter: float = 0.0
    router_z_loss_coef: float = 1e-3
    router_balance_coef: float = 1e-2
    skill_loss_coef: float = 1e-1
    skill_groups: dict[str, list[int]] | None = None
    skill_parents: dict[str, str] | None = None
    skill_order: list[str] | None = None
    dispatch: str = "auto"
    capacity_factor: float | None = None
    tie_word_embeddings: bool = False
    trajectory_decoder: str = "text"
    plan_loss_coef: float = 1.0
    balancing: str = "aux_loss"
    aux_free_rate: float = 1e-3

    def __post_init__(self, **kwargs):
        if "top_k" in kwargs:  # alias; generation options named top_k would otherwise be popped silently
            self.num_experts_per_tok = kwargs.pop("top_k")
        # the base PreTrainedConfig pushes our (unset) attention implementation down into the sub-configs; keep the
        # base VLM's own choice when we wrap an existing config object
        snapshot = None
        if isinstance(self.base_config, PretrainedConfig) and "attn_implementation" not in kwargs:
            snapshot = [(c, c._attn_implementation_internal) for c in _config_tree(self.base_config)]
        super().__post_init__(**kwargs)
        if snapshot is not None:
            for cfg, impl in snapshot:
                cfg._attn_implementation_internal = impl
            self._attn_implementation_internal = self.base_config._attn_implementation_internal
        self.validate_moe()

    # ---- validation ------------------------------------------------------------------------------------------
    def validate_moe(self) -> None:
        check_base_config(self.base_config)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MoSEConfig.num_experts: expected a positive integer, got {self.num_experts!r}.")
        k = self.num_experts_per_tok
        if not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"MoSEConfig.num_experts_per_tok (top_k): expected 1 <= top_k <= num_experts={self.num_experts}, got {k!r}.")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"MoSEConfig.dispatch: expected one of {DISPATCHES}, got {self.dispatch!r}.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoSEConfig.capacity_factor: expected None (dropless) or > 0, got {self.capacity_factor!r}.")
        if self.expert_intermediate_size is not None and not self.expert_intermediate_size > 0:
            raise ValueError(f"MoSEConfig.expert_intermediate_size: expected None or > 0, got {self.expert_intermediate_size!r}.")
        from .moe import BALANCING

        if self.balancing not in BALANCING:
            raise ValueError(f"MoSEConfig.balancing: expected one of {BALANCING}, got {self.balancing!r}.")
        if isinstance(self.aux_free_rate, bool) or not isinstance(self.aux_free_rate, (int, float)) or not self.aux_free_rate >= 0:
            raise ValueError(f"MoSEConfig.aux_free_rate: expected a number >= 0 (DeepSeek-V3: 0.001), got {self.aux_free_rate!r}.")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"MoSEConfig.router_jitter: expected 0 <= jitter < 1, got {self.router_jitter!r}.")
        from .trajectory_decoders import check_decoder

        check_decoder(self.trajectory_decoder)
        for name in ("router_z_loss_coef", "router_balance_coef", "skill_loss_coef", "plan_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoSEConfig.{name}: expected >= 0, got {getattr(self, name)!r}.")
        if isinstance(self.moe_layers, tuple):
            self.moe_layers = list(self.moe_layers)
        self.moe_layer_indices  # resolves and validates the placement
        self._validate_skills()

    def _validate_skills(self) -> None:
        groups, parents = self.skill_groups or {}, self.skill_parents or {}
        if not isinstance(groups, dict) or not isinstance(parents, dict):
            raise ValueError("MoSEConfig.skill_groups / skill_parents: expected dicts (skill -> expert list, skill -> parent skill).")
        if self.skill_order is not None:  # restore skill-id order (config.json sorts dict keys)
            order = list(self.skill_order)
            if sorted(order) != sorted(groups) or len(set(order)) != len(order):
                raise ValueError(f"MoSEConfig.skill_order: expected each key of skill_groups exactly once, got {order!r} "
                                 f"for skill_groups keys {sorted(groups)!r}.")
            if list(groups) != order:
                self.skill_groups = groups = {name: groups[name] for name in order}
            self.skill_order = None  # consumed: to_dict writes the current order, so a later reassignment cannot go stale
        for skill, experts in groups.items():
            experts = list(experts) if isinstance(experts, (list, tuple)) else experts
            if not isinstance(experts, list) or not experts:
                raise ValueError(f"MoSEConfig.skill_groups[{skill!r}]: expected a non-empty list of expert indices, got {experts!r}.")
            bad = [e for e in experts if not (isinstance(e, int) and 0 <= e < self.num_experts)]
            if bad:
                raise ValueError(
                    f"MoSEConfig.skill_groups[{skill!r}]: unknown expert indices {bad}; experts are 0..{self.num_experts - 1}."
                )
        for child, parent in parents.items():
            if child not in groups or parent not in groups:
                missing = [s for s in (child, parent) if s not in groups]
                raise ValueError(f"MoSEConfig.skill_parents[{child!r}] = {parent!r}: skills {missing} are not in skill_groups.")
            if child == parent:
                raise ValueError(f"MoSEConfig.skill_parents[{child!r}]: a skill cannot be its own parent.")

    def to_dict(self) -> dict:
        out = super().to_dict()
        # the skill order as it is now (skill_groups may have been reassigned since construction)
        out["skill_order"] = list(self.skill_groups) if self.skill_groups else None
        return out

    # ---- derived views ---------------------------------------------------------------------------------------
    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def moe_layer_indices(self) -> list[int]:
        return resolve_moe_layers(self.moe_layers, self.get_text_config(decoder=True).num_hidden_layers)

    @property
    def expert_ffn_size(self) -> int:
        return self.expert_intermediate_size or self.get_text_config(decoder=True).intermediate_size

    @property
    def skill_names(self) -> list[str]:
        return list(self.skill_groups or {})

    def skill_parent_ids(self) -> list[int]:
        """Per skill id, the id of its coarse parent (-1 for a top-level skill)."""
        names = self.skill_names
        parents = self.skill_parents or {}
        return [names.index(parents[s]) if s in parents else -1 for s in names]


__all__ = ["MoSEConfig", "SUPPORTED_BASES", "check_base_config", "resolve_moe_layers"]

_DEFINED = True
if __name__.startswith("mose."):  # in the package (not the copy inside a checkpoint): register with the Auto classes
    sys.modules["mose"]._register_auto_classes()
