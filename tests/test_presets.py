"""Presets: the tiny model, parameter counts from configs alone (analytic vs meta-device builds vs published sizes),
and the `mose presets` command."""
import argparse
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlavaConfig, Qwen2_5_VLConfig

from mose.config import MoSEConfig
from mose.presets import PRESETS, add_arguments, base_config, build_preset, count_parameters, preset_config, run

# Published parameter counts of the dense hub models (model cards / safetensors metadata).
PUBLISHED_TOTALS = {"qwen2-vl-2b-mose": 2_208_985_600, "qwen2.5-vl-3b-mose": 3_754_622_976}


def meta_numel(config) -> int:
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_tiny_preset_builds_with_a_few_million_parameters():
    model = build_preset("tiny")  # its build time is measured by benchmarks/, not asserted here
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 10_000_000
    assert count_parameters(model.config)["total"] == n
    ids = torch.randint(3, 2000, (1, 8))
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 8, 2048)


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_counts_match_meta_device_builds(name):
    config = preset_config(name)
    assert count_parameters(config) == count_parameters(config, method="meta")


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_real_base_configs_reproduce_published_sizes(name):
    assert meta_numel(base_config(name)) == PUBLISHED_TOTALS[name]
    # upcycling adds (E - 1) FFN copies + a router per MoE layer; activated adds (k - 1) copies + routers
    cfg = preset_config(name)
    text = cfg.get_text_config(decoder=True)
    ffn, moe = 3 * text.hidden_size * text.intermediate_size, len(cfg.moe_layer_indices)
    routers = moe * cfg.num_experts * text.hidden_size
    counts = count_parameters(cfg)
    assert counts["total"] == PUBLISHED_TOTALS[name] + moe * (cfg.num_experts - 1) * ffn + routers
    assert counts["activated"] == PUBLISHED_TOTALS[name] + moe * (cfg.num_experts_per_tok - 1) * ffn + routers


@pytest.mark.parametrize(
    "base",
    [
        LlavaConfig(  # SigLIP with its attention-pooling head, two feature layers, a Llama text model with biases
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, image_size=32, patch_size=8),
            text_config=dict(model_type="llama", hidden_size=64, intermediate_size=80, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=300, attention_bias=True,
                             tie_word_embeddings=True),
            vision_feature_layer=[-1, -2], image_token_index=299,
        ),
        LlavaConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, image_size=16, patch_size=8),
            text_config=dict(model_type="qwen3", hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=300),
            image_token_index=299, multimodal_projector_bias=False,
        ),
        Qwen2_5_VLConfig(
            text_config=dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=300,
                             rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64,
                               patch_size=4, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1]),
        ),
    ],
    ids=["llava-llama-siglip-head", "llava-qwen3", "qwen2.5-vl"],
)
@pytest.mark.parametrize("shared", [False, True])
def test_analytic_counts_match_meta_builds_for_other_bases(base, shared):
    config = MoSEConfig(base_config=base, num_experts=3, top_k=2, moe_layers="all", shared_expert=shared)
    assert count_parameters(config) == count_parameters(config, method="meta")


def test_a_real_preset_activates_fewer_than_3b_parameters():
    real = [n for n, p in PRESETS.items() if p.hub_id]
    assert len(real) >= 2
    assert any(count_parameters(preset_config(n))["activated"] < 3e9 for n in real)
    for n in real:
        counts = count_parameters(preset_config(n))
        assert counts["activated"] < counts["total"]


def test_preset_overrides_and_unknown_names():
    cfg = preset_config("tiny", num_experts=6, top_k=1, skill_groups={"planning": [5]})
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.skill_groups) == (6, 1, {"planning": [5]})
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset_config("nope")
    with pytest.raises(ValueError, match="top_k"):
        preset_config("tiny", top_k=9)


def test_presets_command_table_and_json(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([])) == 0
    table = capsys.readouterr().out
    assert "qwen2-vl-2b-mose" in table and "activated" in table and "2.79B" in table
    assert run(parser.parse_args(["--json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(PRESETS)
    tiny = next(r for r in rows if r["name"] == "tiny")
    assert tiny["total_params"] == count_parameters(preset_config("tiny"))["total"]
