"""MoSE model: a Hugging Face VLM whose chosen decoder FFNs are sparse, skill-routed mixture-of-experts blocks.

    vlm = AutoModelForImageTextToText.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")
    model = mose.upcycle(vlm, num_experts=4, top_k=2, moe_layers="every_other", skill_groups=..., skill_parents=...)
    out = model(**batch, labels=labels, skill_labels=skill_labels)   # out.loss = LM loss + aux_loss
    model.save_pretrained("ckpt")                                     # safetensors
    AutoModelForImageTextToText.from_pretrained("ckpt")               # plain transformers, after `import mose`

The wrapped VLM keeps its own modules, forward and generation logic (LLaVA / Qwen2-VL rope handling, KV cache);
MoSE only swaps `layers[i].mlp` for `MoSESparseBlock`s and adds the routing losses, statistics and trace.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .config import MoSEConfig, check_base_config
from .moe import (
    IGNORE_INDEX,
    MoSESparseBlock,
    RoutingRecorder,
    RoutingTrace,
    load_balance_loss,
    router_z_loss,
    routing_entropy,
    skill_group_matrix,
    skill_routing_accuracy,
    skill_routing_loss,
)
from .trajectory_decoders import PlanningHead, constant_velocity_prior, plan_features, plan_loss

# config keys that `upcycle(base_model, **moe_options)` accepts
MOE_OPTIONS = (
    "num_experts", "num_experts_per_tok", "top_k", "moe_layers", "expert_intermediate_size", "shared_expert", "router_jitter",
    "router_z_loss_coef", "router_balance_coef", "skill_loss_coef", "skill_groups", "skill_parents", "dispatch",
    "capacity_factor", "trajectory_decoder", "plan_loss_coef", "balancing", "aux_free_rate",
)


@dataclass
class MoSECausalLMOutputWithPast(ModelOutput):
    r"""
    loss: LM loss (when `labels` are given) + `aux_loss`; `aux_loss` alone when only `skill_labels` are given.
    lm_loss: the base model's next-token loss.
    aux_loss: balance_coef * mean_layers(balance) + z_coef * mean_layers(z_loss) + skill_coef * mean_layers(skill_loss).
    router_stats: per MoE layer (tensors of shape (L,)): "balance" (1.0 = perfectly balanced), "z_loss", "entropy",
        "skill_loss", "skill_accuracy" (share of labelled tokens whose top-1 expert is in their skill group); plus
        "expert_load" (L, E): share of token choices per expert; "layers": decoder indices of the MoE layers.
    routing_trace: chosen experts and weights per layer and token (`output_routing_trace=True`).
    plan_poses: (B, 8, 2) the planning head's poses (prior + residual), "head" decoder with `ego_speed` given.
    plan_loss: the head's smooth-L1 residual loss (when `plan_targets` are given); in `loss` times plan_loss_coef.
    cache, image_outputs, video_outputs, audio_outputs: the base VLM's, under transformers 5's names (its
        `MultimodalCausalLMOutputWithPast`, transformers/modeling_outputs.py:573); `past_key_values` still reads `cache`
        through transformers' deprecated alias (utils/generic.py:639), which warns.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: ModelOutput | None = None
    video_outputs: ModelOutput | None = None
    audio_outputs: ModelOutput | None = None
    router_stats: dict[str, torch.Tensor] | None = None
    routing_trace: RoutingTrace | None = None
    plan_poses: torch.FloatTensor | None = None
    plan_loss: torch.FloatTensor | None = None


def _base_cache(out) -> object | None:
    """The base output's KV cache: the `cache` field (transformers 5.25's name); `past_key_values` only where the
    output class still declares that field (older 5.x), never through the deprecated alias property."""
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set()
    if "cache" in names:
        return out.cache
    return getattr(out, "past_key_values", None) if "past_key_values" in names else None


def decoder_layers(vlm: nn.Module) -> nn.ModuleList:
    """The text decoder's layers of a supported Hugging Face VLM."""
    layers = getattr(vlm.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"MoSE: cannot find the text decoder layers of {type(vlm).__name__}.")
    return layers


def _check_dense_ffn(mlp: nn.Module, layer_idx: int, hidden: int, inter: int) -> None:
    for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear) or lin.bias is not None or tuple(lin.weight.shape) != shape:
            raise ValueError(
                f"MoSE: decoder layer {layer_idx}'s FFN ({type(mlp).__name__}) is not a bias-free gate/up/down SwiGLU "
                f"with weights {shape}; cannot upcycle it."
            )


class MoSEForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = MoSEConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoSESparseBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def __init__(self, config: MoSEConfig, vlm: PreTrainedModel | None = None):
        super().__init__(config)
        if vlm is None:
            vlm = AutoModelForImageTextToText.from_config(config.base_config)
        else:  # an existing (possibly pretrained) VLM: its weights are already set, never re-initialise them
            for module in vlm.modules():
                module._is_hf_initialized = True
        self.vlm = vlm
        text = config.get_text_config(decoder=True)
        layers = decoder_layers(vlm)
        if len(layers) != text.num_hidden_layers:
            raise ValueError(f"MoSE: the base VLM has {len(layers)} decoder layers, its config says {text.num_hidden_layers}.")
        for i in config.moe_layer_indices:
            dense = layers[i].mlp
            ref = getattr(dense, "gate_proj", None)
            block = MoSESparseBlock(
                text.hidden_size, config.expert_ffn_size, config.num_experts, config.num_experts_per_tok,
                shared_expert=config.shared_expert, shared_intermediate_size=text.intermediate_size,
                router_jitter=config.router_jitter, dispatch=config.dispatch, capacity_factor=config.capacity_factor,
                layer_idx=i, balancing=config.balancing,
            )
            if isinstance(ref, nn.Linear) and ref.weight.device.type != "meta":
                block = block.to(device=ref.weight.device, dtype=ref.weight.dtype)
            layers[i].mlp = block
        self.plan_head = None
        if config.trajectory_decoder == "head":  # mose/trajectory_decoders.py: residual to a constant-velocity prior
            self.plan_head = PlanningHead(text.hidden_size)
        self.post_init()
        if self.plan_head is not None:  # after post_init's generic init: zero last layer, an untrained head plans the prior
            with torch.no_grad():
                self.plan_head.reset_parameters()

    # ---- plumbing: everything else is the wrapped VLM's ------------------------------------------------------------
    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a self-contained checkpoint: the in-package model also writes its code
        (flattened, relative imports; mose/remote_code.py) and an `auto_map` in config.json, so that
        `from_pretrained(ckpt, trust_remote_code=True)` works where this package is not installed. A copy loaded as
        remote code re-saves through transformers' own `custom_object_save` (it has `_auto_class` set on load)."""
        if not __name__.startswith("mose."):  # the copy inside a checkpoint, loaded as remote code
            return super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        remote = importlib.import_module("mose.remote_code")
        had, previous = "auto_map" in self.config.__dict__, self.config.__dict__.get("auto_map")
        self.config.auto_map = remote.auto_map(type(self.config), type(self))
        try:  # auto_map only in this save's config.json (resume checkpoints write the config without the code)
            super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        finally:
            if had:
                self.config.auto_map = previous
            else:
                del self.config.auto_map
        if is_main_process:
            remote.write_remote_code(save_directory, type(self.config), type(self))

    def get_input_embeddings(self):
        return self.vlm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.vlm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.vlm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.vlm.set_output_embeddings(value)

    def get_decoder(self):
        return self.vlm.get_decoder()

    def moe_blocks(self) -> list[MoSESparseBlock]:
        return [m for m in self.modules() if isinstance(m, MoSESparseBlock)]

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """Generation with the base VLM's own logic (KV cache, multimodal rope); the MoE blocks run inside it."""
        self.vlm.generation_config = self.generation_config  # ours is the one saved / loaded with the checkpoint
        return self.vlm.generate(*args, **kwargs)

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        skill_labels: torch.LongTensor | None = None,
        output_routing_trace: bool = False,
        ego_speed: torch.Tensor | None = None,
        plan_index: torch.LongTensor | None = None,
        plan_targets: torch.Tensor | None = None,
        **kwargs,
    ) -> MoSECausalLMOutputWithPast:
        r"""
        skill_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): per-token skill id
            (index into `config.skill_groups`) or -100 for tokens without a skill; trains the router towards each
            token's skill expert group (fine and coarse level).
        output_routing_trace (`bool`): also return the chosen experts and weights of every token in every MoE layer.
        ego_speed (`torch.Tensor` of shape `(batch_size,)`, *optional*; "head" decoder only): the prompt's ego speed
            (m/s), the constant-velocity prior of the planning head; given, the output has `plan_poses`.
        plan_index (`torch.LongTensor` of shape `(batch_size,)`, *optional*): the plan token's position (the last
            prompt token); default the last attended position of each row.
        plan_targets (`torch.Tensor` of shape `(batch_size, 8, 2)`, *optional*): target poses; rows with a negative
            `plan_index`, a non-finite speed or non-finite targets have none. Given, the output has `plan_loss`.
        All other arguments (pixel_values, image_grid_thw, cache, use_cache, ...) go to the base VLM unchanged.
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("MoSE forward: pass input_ids or inputs_embeds.")
        batch, seq = ref.shape[:2]
        if skill_labels is not None:
            self._check_skill_labels(skill_labels, (batch, seq))
        plan = ego_speed is not None or plan_targets is not None or plan_index is not None
        if plan and self.plan_head is None:
            raise ValueError(f"MoSE forward: ego_speed / plan_index / plan_targets given, but config.trajectory_decoder is "
                             f"{self.config.trajectory_decoder!r}; the planning inputs are for the 'head' decoder.")
        if plan and ego_speed is None:
            raise ValueError("MoSE forward: plan_index / plan_targets need ego_speed (B,) (the constant-velocity prior).")
        recorder = RoutingRecorder()
        blocks = self.moe_blocks()
        for block in blocks:
            block.recorder = recorder
        captured = {}
        hook = None
        if plan:  # the text decoder's last hidden state (after its final norm), without keeping every layer's
            hook = self.vlm.get_decoder().register_forward_hook(
                lambda _m, _a, output: captured.__setitem__("h", output[0] if isinstance(output, tuple) else output.last_hidden_state))
        try:
            out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        finally:
            for block in blocks:
                block.recorder = None
            if hook is not None:
                hook.remove()
        plan_poses = p_loss = None
        if plan:
            plan_poses, p_loss = self._plan(captured["h"], attention_mask, ego_speed, plan_index, plan_targets)
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq:].reshape(-1).bool()
        aux_loss, stats = self._routing_losses(recorder.records, token_mask, skill_labels)
        trace = None
        if output_routing_trace and recorder.records:
            trace = RoutingTrace(
                layers=[r.layer_idx for r in recorder.records],
                experts=torch.stack([r.top_i.view(batch, seq, -1) for r in recorder.records]).detach(),
                weights=torch.stack([r.top_w.view(batch, seq, -1) for r in recorder.records]).detach(),
                num_experts=self.config.num_experts,
            )
        lm_loss = getattr(out, "loss", None)
        if lm_loss is not None:
            loss = lm_loss + aux_loss.to(lm_loss.dtype)
        elif skill_labels is not None:
            loss = aux_loss
        else:
            loss = None
        if p_loss is not None:
            loss = (0.0 if loss is None else loss) + self.config.plan_loss_coef * p_loss
        return MoSECausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            logits=out.logits,
            # transformers 5 names: `past_key_values` / `image_hidden_states` of the base output are deprecated aliases
            # that warn (transformers/utils/generic.py:639, models/llava/modeling_llava.py:56)
            cache=_base_cache(out),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            image_outputs=getattr(out, "image_outputs", None),
            video_outputs=getattr(out, "video_outputs", None),
            audio_outputs=getattr(out, "audio_outputs", None),
            router_stats=stats,
            routing_trace=trace,
            plan_poses=plan_poses,
            plan_loss=p_loss,
        )

    def _plan(self, hidden, attention_mask, ego_speed, plan_index, plan_targets):
        """(poses (B, 8, 2), loss or None) of the planning head at the plan token (mose/trajectory_decoders.py)."""
        batch, seq = hidden.shape[:2]
        speed = torch.as_tensor(ego_speed, device=hidden.device).float().reshape(-1)
        if speed.numel() != batch:
            raise ValueError(f"MoSE forward: ego_speed has {speed.numel()} values, expected one per row ({batch}).")
        if plan_index is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                m = attention_mask[:, -seq:].long()
                plan_index = seq - 1 - torch.flip(m, dims=[1]).argmax(dim=1)
            else:
                plan_index = torch.full((batch,), seq - 1, dtype=torch.long, device=hidden.device)
        idx = torch.as_tensor(plan_index, device=hidden.device).long().reshape(-1)
        if idx.numel() != batch or bool((idx >= seq).any()):
            raise ValueError(f"MoSE forward: plan_index must hold one position < {seq} per row (negative: no plan), got {idx.tolist()}.")
        h = plan_features(hidden, idx, attention_mask, speed)
        residual = self.plan_head(h.to(self.plan_head.fc_in.weight.dtype)).float()
        prior = constant_velocity_prior(torch.nan_to_num(speed, nan=0.0), residual.shape[1]).to(residual.device)
        poses = prior + residual
        loss = None
        if plan_targets is not None:
            targets = torch.as_tensor(plan_targets, device=hidden.device).float()
            if tuple(targets.shape) != tuple(poses.shape):
                raise ValueError(f"MoSE forward: plan_targets has shape {tuple(targets.shape)}, expected {tuple(poses.shape)}.")
            mask = (idx >= 0) & torch.isfinite(speed) & torch.isfinite(targets).flatten(1).all(dim=1)
            loss = plan_loss(residual, prior, torch.nan_to_num(targets), mask)
        return poses, loss

    @torch.no_grad()
    def plan(self, ego_speed, **inputs) -> torch.Tensor:
        """(B, 8, 2) poses of the planning head for prompts (`inputs` as for generate; the plan token is each row's
        last attended token, the end of the prompt)."""
        return self(ego_speed=ego_speed, **inputs).plan_poses

    def _check_skill_labels(self, skill_labels: torch.Tensor, expected: tuple[int, int]) -> None:
        num_skills = len(self.config.skill_names)
        if num_skills == 0:
            raise ValueError("MoSE forward: skill_labels given but config.skill_groups is empty (no skill -> expert map).")
        if tuple(skill_labels.shape) != expected:
            raise ValueError(
                f"MoSE forward: skill_labels has shape {tuple(skill_labels.shape)}, expected {expected} "
                "(one skill id or -100 per input token, image tokens included)."
            )
        if skill_labels.is_floating_point():
            raise ValueError(f"MoSE forward: skill_labels must be integer skill ids, got dtype {skill_labels.dtype}.")
        bad = (skill_labels != IGNORE_INDEX) & ((skill_labels < 0) | (skill_labels >= num_skills))
        if bool(bad.any()):
            raise ValueError(
                f"MoSE forward: skill_labels contains ids {sorted(set(skill_labels[bad].tolist()))[:5]} outside "
                f"0..{num_skills - 1} (the skills of config.skill_groups) and -100 (ignore)."
            )

    def _routing_losses(self, records, token_mask, skill_labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        if not records:
            zero = torch.zeros((), device=self.vlm.device)
            return zero, {}
        device = records[0].logits.device
        labels = groups = parents = None
        if skill_labels is not None:
            labels = skill_labels.reshape(-1).to(device)
            if token_mask is not None:
                labels = labels.masked_fill(~token_mask, IGNORE_INDEX)
            groups = skill_group_matrix(cfg.skill_groups, cfg.num_experts, device=device)
            parents = torch.tensor(cfg.skill_parent_ids(), device=device)
        # aux_free: this micro-batch's real-token choices feed the next bias update (here, once per forward, so a
        # gradient-checkpointing recompute in backward never counts a batch twice)
        count = {b.layer_idx: b.router for b in self.moe_blocks()} if self.training and cfg.balancing == "aux_free" else {}
        per_layer: dict[str, list[torch.Tensor]] = {k: [] for k in ("balance", "z_loss", "entropy", "skill_loss", "skill_accuracy", "expert_load")}
        for r in records:
            per_layer["balance"].append(load_balance_loss(r.logits, r.top_i, token_mask))
            per_layer["z_loss"].append(router_z_loss(r.logits, token_mask))
            per_layer["entropy"].append(routing_entropy(r.logits, token_mask).detach())
            top_i = r.top_i if token_mask is None else r.top_i[token_mask]
            load = torch.bincount(top_i.reshape(-1), minlength=cfg.num_experts).float()
            if r.layer_idx in count:
                count[r.layer_idx].count_load(top_i)
            per_layer["expert_load"].append(load / load.sum().clamp_min(1))
            if labels is not None:
                per_layer["skill_loss"].append(skill_routing_loss(r.logits, labels, groups, parents))
                per_layer["skill_accuracy"].append(skill_routing_accuracy(r.top_i, labels, groups))
        stats = {k: torch.stack(v) for k, v in per_layer.items() if v}
        aux = cfg.router_balance_coef * stats["balance"].mean() + cfg.router_z_loss_coef * stats["z_loss"].mean()
        if "skill_loss" in stats:
            aux = aux + cfg.skill_loss_coef * stats["skill_loss"].mean()
        stats = {k: v.detach() for k, v in stats.items()}
        stats["layers"] = torch.tensor([r.layer_idx for r in records])
        return aux, stats


def router_log(stats: dict[str, torch.Tensor], prefix: str = "router") -> dict[str, float]:
    """Flatten `router_stats` into scalars for a logger: per layer and the mean over layers (never a sum)."""
    logs: dict[str, float] = {}
    layers = stats.get("layers")
    for name, values in stats.items():
        if name in ("layers", "expert_load"):
            continue
        logs[f"{prefix}/{name}/mean"] = float(values.float().mean())
        for layer, v in zip(layers.tolist(), values.tolist()):
            logs[f"{prefix}/{name}/layer_{layer}"] = float(v)
    return logs


# ---- upcycling -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def upcycle(base_model: PreTrainedModel, *, seed: int = 0, **moe_options) -> MoSEForConditionalGeneration:
    """Turn a dense Hugging Face VLM into a MoSE model by copying each chosen decoder FFN into every expert.

    The router gets a small random init (seeded); since the experts are identical and the top-k weights are
    renormalised to sum to 1, the upcycled model's logits equal the dense model's (to float rounding). With
    `shared_expert=True` the shared expert is a copy of the FFN too and both halves' down projections are scaled by
    1/2 (exact in binary floating point), so shared + routed again equals the dense FFN.

    `base_model` is modified in place (its chosen FFNs are replaced) and becomes `model.vlm`.
    """
    unknown = set(moe_options) - set(MOE_OPTIONS)
    if unknown:
        raise TypeError(f"upcycle: unknown options {sorted(unknown)}; accepted: {', '.join(MOE_OPTIONS)}.")
    if not isinstance(base_model, PreTrainedModel):
        raise TypeError(f"upcycle: expected a Hugging Face PreTrainedModel, got {type(base_model).__name__}.")
    check_base_config(base_model.config)  # unsupported architectures fail before anything else
    config = MoSEConfig(base_config=base_model.config, **moe_options)  # validates every option
    text = config.get_text_config(decoder=True)
    if config.expert_ffn_size != text.intermediate_size:
        raise ValueError(
            f"upcycle: expert_intermediate_size={config.expert_intermediate_size} differs from the dense FFN width "
            f"{text.intermediate_size}; upcycled experts are copies of the dense FFN."
        )
    act = getattr(text, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"upcycle: the base text model's FFN activation is {act!r}; MoSE experts are SwiGLU (silu).")
    layers = decoder_layers(base_model)
    dense = {}
    for i in config.moe_layer_indices:
        _check_dense_ffn(layers[i].mlp, i, text.hidden_size, text.intermediate_size)
        dense[i] = layers[i].mlp
    # all checks passed: now build and copy
    model = MoSEForConditionalGeneration(config, vlm=base_model)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(text, "initializer_range", 0.02)
    scale = 0.5 if config.shared_expert else 1.0
    for block in model.moe_blocks():
        mlp = dense[block.layer_idx]
        w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        block.experts.gate_up_proj.copy_(torch.cat([w_gate, w_up], dim=0).unsqueeze(0).expand_as(block.experts.gate_up_proj))
        block.experts.down_proj.copy_((w_down * scale).unsqueeze(0).expand_as(block.experts.down_proj))
        router = torch.randn(block.router.weight.shape, generator=gen) * std
        block.router.weight.copy_(router)
        if block.shared_expert is not None:
            block.shared_expert.gate_proj.weight.copy_(w_gate)
            block.shared_expert.up_proj.weight.copy_(w_up)
            block.shared_expert.down_proj.weight.copy_(w_down * scale)
    return model


__all__ = ["MoSEForConditionalGeneration", "MoSECausalLMOutputWithPast", "upcycle", "router_log", "decoder_layers"]

_DEFINED = True
if __name__.startswith("mose."):  # in the package (not the copy inside a checkpoint): register with the Auto classes
    sys.modules["mose"]._register_auto_classes()
