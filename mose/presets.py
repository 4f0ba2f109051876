"""Model presets and parameter counts computed from configs alone (nothing is downloaded).

    build_preset("tiny")                 # random-init LLaVA-style SigLIP + Qwen2 MoSE, a few million parameters
    preset_config("qwen2-vl-2b-mose")    # MoSEConfig of a real preset, from the hub config's numbers written below
    count_parameters(config)             # {"total": ..., "activated": ...} analytically (checked against meta builds)
    mose presets [--json]                # the table

The real presets name a hub VLM; to train one, upcycle its pretrained weights:
    upcycle(AutoModelForImageTextToText.from_pretrained(p.hub_id), **p.moe_options)
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from .config import MoSEConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    base_config: dict  # the base VLM's config.json (key numbers of the hub config for real presets)
    moe_options: dict = field(default_factory=dict)
    hub_id: str | None = None  # pretrained dense VLM to upcycle; None = random init only


# Key numbers of the hub configs (config.json of each repository), written here so nothing needs downloading.
QWEN2_VL_2B = {
    "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
    "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
    },
}
QWEN2_5_VL_3B = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}
TINY_LLAVA = {
    "model_type": "llava", "image_token_index": 2047, "image_seq_length": 16, "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "vision_use_head": False,
    },
    "text_config": {
        "model_type": "qwen2", "vocab_size": 2048, "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    },
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny", "LLaVA-style SigLIP + Qwen2, random init: tests and the demo", TINY_LLAVA,
            {"num_experts": 4, "top_k": 2, "moe_layers": "every_other"},
        ),
        Preset(
            "qwen2-vl-2b-mose", "Qwen2-VL-2B upcycled: 4 experts, top-2, every other layer", QWEN2_VL_2B,
            {"num_experts": 4, "top_k": 2, "moe_layers": "every_other"}, hub_id="Qwen/Qwen2-VL-2B-Instruct",
        ),
        Preset(
            "qwen2-vl-2b-mose-8e", "Qwen2-VL-2B upcycled: 8 experts, top-1, second half", QWEN2_VL_2B,
            {"num_experts": 8, "top_k": 1, "moe_layers": "second_half"}, hub_id="Qwen/Qwen2-VL-2B-Instruct",
        ),
        Preset(
            "qwen2.5-vl-3b-mose", "Qwen2.5-VL-3B upcycled: 4 experts, top-2, every other layer", QWEN2_5_VL_3B,
            {"num_experts": 4, "top_k": 2, "moe_layers": "every_other"}, hub_id="Qwen/Qwen2.5-VL-3B-Instruct",
        ),
    )
}


def _get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def base_config(name: str):
    """The base VLM's transformers config of a preset."""
    from transformers import AutoConfig

    raw = dict(_get(name).base_config)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def preset_config(name: str, **overrides) -> MoSEConfig:
    """The MoSEConfig of a preset; `overrides` replace its MoE options (e.g. skill_groups=..., dispatch=...)."""
    return MoSEConfig(base_config=base_config(name), **{**_get(name).moe_options, **overrides})


def build_preset(name: str, *, seed: int = 0, device=None, **overrides):
    """A random-init MoSE model of a preset. For real presets this allocates the full model (pass device="meta" for
    a weightless skeleton); to start from pretrained weights use `upcycle` on the hub model instead."""
    import torch

    from .modeling import MoSEForConditionalGeneration

    config = preset_config(name, **overrides)
    torch.manual_seed(seed)
    if device is None:
        return MoSEForConditionalGeneration(config).eval()
    with torch.device(device):
        return MoSEForConditionalGeneration(config).eval()


# ---- parameter counts from the config alone -----------------------------------------------------------------------


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _vision_params(cfg) -> int:
    v = cfg.vision_config
    if cfg.model_type == "llava":  # SigLIP (or CLIP-like) tower + 2-layer projector
        if v.model_type != "siglip_vision_model":
            raise ValueError(f"analytic count: unsupported LLaVA vision tower {v.model_type!r} (use method='meta')")
        d, inter, c = v.hidden_size, v.intermediate_size, v.num_channels
        n = c * d * v.patch_size**2 + d + (v.image_size // v.patch_size) ** 2 * d  # patch conv + positions
        n += v.num_hidden_layers * (4 * _linear(d, d, True) + _linear(d, inter, True) + _linear(inter, d, True) + 4 * d)
        n += 2 * d  # post layernorm
        if getattr(v, "vision_use_head", True):  # attention-pooling head
            n += d + 3 * d * d + 3 * d + _linear(d, d, True) + 2 * d + _linear(d, inter, True) + _linear(inter, d, True)
        layers = 1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer)
        h = cfg.text_config.hidden_size
        bias = cfg.multimodal_projector_bias
        return n + _linear(d * layers, h, bias) + _linear(h, h, bias)
    m2 = v.spatial_merge_size**2
    if cfg.model_type == "qwen2_vl":  # LayerNorm blocks with a GELU MLP, LayerNorm merger
        d = v.embed_dim
        block = 2 * 2 * d + _linear(d, 3 * d, True) + _linear(d, d, True)
        block += _linear(d, d * v.mlp_ratio, True) + _linear(d * v.mlp_ratio, d, True)
        merger = 2 * d + _linear(d * m2, d * m2, True) + _linear(d * m2, v.hidden_size, True)
    else:  # qwen2_5_vl: RMSNorm blocks with a SwiGLU MLP, RMSNorm merger
        d, inter = v.hidden_size, v.intermediate_size
        block = 2 * d + _linear(d, 3 * d, True) + _linear(d, d, True) + 2 * _linear(d, inter, True) + _linear(inter, d, True)
        merger = d + _linear(d * m2, d * m2, True) + _linear(d * m2, v.out_hidden_size, True)
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2 * d
    return patch + v.depth * block + merger


def _text_params(cfg, tie: bool) -> tuple[int, int]:
    """(parameters outside the FFNs, parameters of one dense FFN) of the text decoder."""
    t = cfg.get_text_config(decoder=True)
    h, nh, nkv = t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    hd = getattr(t, "head_dim", None) or h // nh
    if t.model_type in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text"):
        qkv_bias, o_bias, qk_norm = True, False, False
    else:  # llama, qwen3
        qkv_bias = o_bias = bool(getattr(t, "attention_bias", False))
        qk_norm = t.model_type == "qwen3"
    attn = _linear(h, nh * hd, qkv_bias) + 2 * _linear(h, nkv * hd, qkv_bias) + _linear(nh * hd, h, o_bias)
    attn += 2 * hd if qk_norm else 0
    layer = attn + 2 * h  # + input / post-attention RMSNorms
    embed = t.vocab_size * h
    other = embed + t.num_hidden_layers * layer + h + (0 if tie else embed)
    return other, 3 * h * t.intermediate_size


def count_parameters(config: MoSEConfig, method: str = "analytic") -> dict[str, int]:
    """Total and activated parameters of a MoSE model (activated: what one token runs through, i.e. everything except
    the experts it is not routed to; the vision tower counts as activated). method: "analytic" or "meta" (builds the
    model on the meta device: exact for any supported base, no memory)."""
    text = config.get_text_config(decoder=True)
    h, num_moe = text.hidden_size, len(config.moe_layer_indices)
    expert = 3 * h * config.expert_ffn_size
    inactive = num_moe * (config.num_experts - config.num_experts_per_tok) * expert
    if method == "meta":
        import torch

        from .modeling import MoSEForConditionalGeneration

        with torch.device("meta"):
            model = MoSEForConditionalGeneration(config)
        total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are counted once
        return {"total": total, "activated": total - inactive}
    if method != "analytic":
        raise ValueError(f"count_parameters: method must be 'analytic' or 'meta', got {method!r}")
    base = config.base_config
    tie = bool(getattr(base, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
    other, dense_ffn = _text_params(base, tie)
    moe_layer = config.num_experts * expert + config.num_experts * h + (dense_ffn if config.shared_expert else 0)
    total = _vision_params(base) + other + (text.num_hidden_layers - num_moe) * dense_ffn + num_moe * moe_layer
    return {"total": total, "activated": total - inactive}


def preset_table() -> list[dict]:
    rows = []
    for p in PRESETS.values():
        cfg = preset_config(p.name)
        counts = count_parameters(cfg)
        rows.append({
            "name": p.name, "base": p.hub_id or "random init", "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
            "moe_layers": len(cfg.moe_layer_indices), "layers": cfg.get_text_config(decoder=True).num_hidden_layers,
            "total_params": counts["total"], "activated_params": counts["activated"], "description": p.description,
        })
    return rows


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# ---- `mose presets` -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args: argparse.Namespace) -> int:
    rows = preset_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["preset", "base model", "experts", "top-k", "MoE layers", "total", "activated"]
    table = [
        [r["name"], r["base"], str(r["experts"]), str(r["top_k"]), f"{r['moe_layers']}/{r['layers']}",
         _human(r["total_params"]), _human(r["activated_params"])]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


__all__ = ["PRESETS", "Preset", "build_preset", "preset_config", "base_config", "count_parameters", "preset_table"]
