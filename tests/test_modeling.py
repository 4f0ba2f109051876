"""The MoSE model: upcycling equals the dense model, save/load with plain transformers, generation with the KV cache,
routing losses through the model, LoRA, and clear errors on bad input."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, BertConfig, BertModel, LlavaConfig, Qwen2VLConfig

import mose
from mose import MoSEConfig, MoSEForConditionalGeneration, upcycle
from mose.moe import MoSESparseBlock

SKILLS = {"perception": [0, 1], "prediction": [1, 2], "planning": [2, 3], "perception/objects": [0]}
PARENTS = {"perception/objects": "perception"}


def llava_config(text_type="qwen2", layers=2):
    text = dict(model_type=text_type, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, initializer_range=0.2)
    if text_type == "qwen3":
        text["head_dim"] = 16
    return LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8, vision_use_head=False),
        text_config=text, image_token_index=500, image_seq_length=4, vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def qwen2vl_config(layers=2):
    return Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
    )


def dense_model(config, seed=0):
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).eval()


def inputs_for(config, batch=2, seq=12, seed=1):
    """input_ids with one image (image tokens already expanded, as the processors do) + pixel inputs."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (batch, seq), generator=gen)
    if config.model_type == "llava":
        ids[:, 1:5] = config.image_token_index
        return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
    ids[:, 1] = config.vision_start_token_id
    ids[:, 2:6] = config.image_token_id  # a 1x4x4 patch grid merged 2x2 -> 4 image tokens
    ids[:, 6] = config.vision_end_token_id
    return {
        "input_ids": ids,
        "mm_token_type_ids": (ids == config.image_token_id).long(),  # 1 = image token (as the processor returns)
        "pixel_values": torch.randn(batch * 16, 3 * 2 * 4 * 4, generator=gen),
        "image_grid_thw": torch.tensor([[1, 4, 4]] * batch),
    }


def mlp_types(model):
    return [type(layer.mlp).__name__ for layer in model.get_decoder().layers]


@pytest.mark.parametrize(
    "config_fn, options",
    [
        (lambda: llava_config("qwen2"), dict(num_experts=4, top_k=2, moe_layers="all")),
        (lambda: llava_config("qwen2"), dict(num_experts=3, top_k=1, moe_layers=[1], shared_expert=True)),
        (lambda: llava_config("llama"), dict(num_experts=2, top_k=2, moe_layers="second_half")),
        (lambda: llava_config("qwen3"), dict(num_experts=4, top_k=2, moe_layers="every_other")),
        (qwen2vl_config, dict(num_experts=4, top_k=2, moe_layers="all")),
        (qwen2vl_config, dict(num_experts=4, top_k=3, moe_layers="every_other", shared_expert=True)),
    ],
    ids=["llava-qwen2", "llava-qwen2-shared", "llava-llama", "llava-qwen3", "qwen2vl", "qwen2vl-shared"],
)
def test_upcycled_logits_equal_dense_logits(config_fn, options):
    config = config_fn()
    dense = dense_model(config)
    batch = inputs_for(config)
    with torch.no_grad():
        expected = dense(**batch).logits
    model = upcycle(dense, **options).eval()
    assert model.vlm is dense and "MoSESparseBlock" in mlp_types(model)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    # the routers are not trivial: different tokens go to different experts
    assert len(torch.unique(out.router_stats["expert_load"][0].nonzero())) > 1 or options["num_experts"] == options["top_k"]


def _tiny_mose(config_fn=llava_config, **options):
    opts = dict(num_experts=4, top_k=2, moe_layers="all", skill_groups=SKILLS, skill_parents=PARENTS)
    return upcycle(dense_model(config_fn()), **{**opts, **options})


def test_forward_returns_per_layer_routing_stats_and_aux_loss():
    model = _tiny_mose().train()
    config = model.config.base_config
    batch = inputs_for(config)
    ids = batch["input_ids"]
    skill_labels = torch.full_like(ids, -100)
    skill_labels[:, 6:] = torch.tensor([0, 3, 1, 2, 3, 0])
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    out = model(**batch, attention_mask=mask, labels=ids, skill_labels=skill_labels, output_routing_trace=True)
    stats = out.router_stats
    assert stats["layers"].tolist() == [0, 1]
    for name in ("balance", "z_loss", "entropy", "skill_loss", "skill_accuracy"):
        assert stats[name].shape == (2,), name
    assert torch.all(stats["balance"] >= 1.0 - 1e-5) and torch.all(stats["balance"] <= 4.0)
    assert torch.allclose(stats["expert_load"].sum(-1), torch.ones(2))
    cfg = model.config
    expected_aux = (cfg.router_balance_coef * stats["balance"].mean() + cfg.router_z_loss_coef * stats["z_loss"].mean()
                    + cfg.skill_loss_coef * stats["skill_loss"].mean())
    torch.testing.assert_close(out.aux_loss.detach(), expected_aux)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.routing_trace.experts.shape == (2, 2, 12, 2) and out.routing_trace.layers == [0, 1]
    usage = out.routing_trace.expert_usage(skill_labels, num_skills=len(SKILLS))
    assert usage.shape == (2, 4, 4)
    torch.testing.assert_close(usage[:, :3].sum(-1), torch.ones(2, 3))  # skills 0-2 have tokens
    out.loss.backward()
    router = model.moe_blocks()[0].router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0  # aux losses reach the router
    # skill labels alone (router pretraining): loss = aux_loss
    out2 = model(**batch, skill_labels=skill_labels)
    torch.testing.assert_close(out2.loss, out2.aux_loss)


def test_gradient_checkpointing_keeps_routing_losses_and_gradients():
    model = _tiny_mose().train()
    batch = inputs_for(model.config.base_config)
    skill_labels = torch.randint(0, 4, batch["input_ids"].shape)

    def grads():
        model.zero_grad()
        out = model(**batch, labels=batch["input_ids"], skill_labels=skill_labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, g_plain = grads()
    model.activation_checkpointing_enable()
    loss_ckpt, g_ckpt = grads()
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("config_fn", [llava_config, qwen2vl_config], ids=["llava", "qwen2vl"])
def test_save_load_round_trip_with_plain_transformers(tmp_path, config_fn):
    model = _tiny_mose(config_fn, shared_expert=True).eval()
    with torch.no_grad():  # make the routers distinct from a fresh init
        for block in model.moe_blocks():
            block.router.weight.normal_()
    batch = inputs_for(model.config.base_config)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert list(SKILLS) != sorted(SKILLS)  # config.json sorts keys: the skill-id order must survive that
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MoSEConfig) and config.skill_groups == SKILLS and config.skill_parents == PARENTS
    assert list(config.skill_groups) == list(SKILLS) and config.skill_parent_ids() == model.config.skill_parent_ids()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoSEForConditionalGeneration)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name in saved:
        assert torch.equal(saved[name], restored[name]), name
    skill_labels = torch.randint(0, len(SKILLS), batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
        # skill id i still means the same expert group: identical skill losses and accuracies
        before, after = model(**batch, skill_labels=skill_labels), loaded(**batch, skill_labels=skill_labels)
    for name in ("skill_loss", "skill_accuracy"):
        assert torch.equal(before.router_stats[name], after.router_stats[name]), name
    # a reassigned map is saved in its new order, and a second round trip keeps it
    loaded.config.skill_groups = dict(reversed(list(SKILLS.items())))
    loaded.save_pretrained(tmp_path / "again")
    assert list(AutoConfig.from_pretrained(tmp_path / "again").skill_groups) == list(reversed(list(SKILLS)))


def test_skill_order_must_name_every_skill_once():
    base = llava_config()
    with pytest.raises(ValueError, match="skill_order"):
        MoSEConfig(base_config=base, num_experts=4, skill_groups=SKILLS, skill_order=["planning", "perception"])
    config = MoSEConfig(base_config=base, num_experts=4, skill_groups=SKILLS, skill_order=sorted(SKILLS))
    assert list(config.skill_groups) == sorted(SKILLS)


@pytest.mark.parametrize("config_fn", [llava_config, qwen2vl_config], ids=["llava", "qwen2vl"])
def test_generate_with_kv_cache_matches_no_cache_greedy(config_fn):
    model = _tiny_mose(config_fn).eval()
    batch = inputs_for(model.config.base_config, batch=2, seq=10)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**batch, use_cache=True, **kwargs)
    without_cache = model.generate(**batch, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache, without_cache)
    # the first generated token is the argmax of the full forward's last logits
    with torch.no_grad():
        first = model(**batch).logits[:, -1].argmax(-1)
    assert torch.equal(with_cache[:, 10], first)


def test_lora_on_attention_and_experts():
    peft = pytest.importorskip("peft")
    model = _tiny_mose(moe_layers=[1]).train()
    text = model.config.get_text_config(decoder=True)
    r, hidden, inter, experts = 4, text.hidden_size, text.intermediate_size, model.config.num_experts
    lora = peft.LoraConfig(
        r=r, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    pm = peft.get_peft_model(model, lora)
    head_dim = hidden // text.num_attention_heads
    per_layer_attn = r * (hidden + text.num_attention_heads * head_dim) + r * (hidden + text.num_key_value_heads * head_dim)
    per_moe_layer = experts * r * (hidden + 2 * inter) + experts * r * (inter + hidden)
    expected = text.num_hidden_layers * per_layer_attn + 1 * per_moe_layer
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("lora_" in n for n in trainable)
    batch = inputs_for(model.config.base_config)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):  # two steps so both LoRA A and B move (B starts at zero)
        out = pm(**batch, labels=batch["input_ids"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)
    assert any("experts" in n for n in changed) and any("q_proj" in n for n in changed)
    assert {n for n in changed if "experts" in n and "lora_A" in n}  # the expert adapters really train


# ---- bad input: clear errors before any weight is touched -----------------------------------------------------------


def _assert_untouched(dense, snapshot):
    assert set(mlp_types(dense)) == {"Qwen2MLP"}
    for name, p in dense.state_dict().items():
        assert torch.equal(p, snapshot[name]), name


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=4, skill_groups={"planning": [1, 7]}), r"unknown expert indices \[7\]"),
        (dict(num_experts=4, skill_groups={"a": [0]}, skill_parents={"b": "a"}), "not in skill_groups"),
        (dict(moe_layers=[0, 5]), r"layer indices \[5\] out of range"),
        (dict(moe_layers="everywhere"), "unknown placement"),
        (dict(dispatch="fast"), "dispatch"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(expert_intermediate_size=32), "differs from the dense FFN width"),
    ],
)
def test_bad_moe_options_fail_before_weights_are_touched(options, message):
    dense = dense_model(llava_config())
    snapshot = copy.deepcopy(dense.state_dict())
    with pytest.raises(ValueError, match=message):
        upcycle(dense, **options)
    _assert_untouched(dense, snapshot)


def test_unsupported_base_architectures_are_rejected():
    with pytest.raises(ValueError, match="unsupported base architecture model_type='bert'"):
        upcycle(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))
    with pytest.raises(ValueError, match="unsupported text model 'mistral'"):
        MoSEConfig(base_config=llava_config("mistral"))
    with pytest.raises(TypeError, match="unknown options"):
        upcycle(dense_model(llava_config()), experts=4)


def test_bad_skill_labels_are_rejected():
    model = _tiny_mose().eval()
    batch = inputs_for(model.config.base_config)
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match=r"skill_labels has shape \(2, 11\), expected \(2, 12\)"):
        model(**batch, skill_labels=torch.zeros(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..3"):
        model(**batch, skill_labels=torch.full_like(ids, 4))
    with pytest.raises(ValueError, match="integer"):
        model(**batch, skill_labels=torch.zeros(ids.shape))
    no_skills = upcycle(dense_model(llava_config()), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="skill_groups is empty"):
        no_skills(**batch, skill_labels=torch.zeros_like(ids))


def test_lazy_public_names_and_registration():
    assert mose.MoSEForConditionalGeneration is MoSEForConditionalGeneration
    assert mose.upcycle is upcycle
    assert AutoConfig.for_model("mose").__class__ is MoSEConfig
    block = MoSESparseBlock(8, 4, 2, 1)
    assert block.experts.gate_up_proj.shape == (2, 8, 8) and block.experts.down_proj.shape == (2, 8, 4)


def test_load_and_generate_in_a_fresh_process_without_deepspeed(tmp_path):
    """A saved checkpoint loads through the Auto classes and generates with deepspeed made unimportable."""
    import os
    import subprocess
    import sys

    model = _tiny_mose().eval()
    batch = inputs_for(model.config.base_config, batch=1, seq=10)
    expected = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)
    torch.save(batch, tmp_path / "batch.pt")
    code = f"""
import sys
sys.modules["deepspeed"] = None  # any `import deepspeed` now fails
import torch, mose.modeling
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}).eval()
batch = torch.load({str(tmp_path / "batch.pt")!r})
out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
print(type(model).__name__, out.tolist())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    name, tokens = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert name == "MoSEForConditionalGeneration" and eval(tokens) == expected.tolist()


def test_router_log_reports_per_layer_and_mean_never_sum():
    from mose.modeling import router_log

    stats = {"balance": torch.tensor([1.0, 3.0]), "layers": torch.tensor([0, 2]), "expert_load": torch.ones(2, 4) / 4}
    logs = router_log(stats)
    assert logs == {"router/balance/mean": 2.0, "router/balance/layer_0": 1.0, "router/balance/layer_2": 3.0}


def test_skill_loss_steps_raise_routing_accuracy_through_the_model():
    """Router pretraining: only the routers train, on the skill loss of a toy labelled batch."""
    model = _tiny_mose(num_experts=6, skill_groups={"perception": [0, 1], "prediction": [2, 3], "planning": [4, 5]},
                       skill_parents=None, router_balance_coef=0.0, router_z_loss_coef=0.0, skill_loss_coef=1.0).train()
    for name, p in model.named_parameters():
        p.requires_grad_("router" in name)
    gen = torch.Generator().manual_seed(0)
    skill_labels = torch.randint(0, 3, (4, 16), generator=gen)
    ids = 10 * skill_labels + torch.randint(5, 7, (4, 16), generator=gen)  # two token ids per skill
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    accuracy = []
    for _ in range(15):
        out = model(input_ids=ids, skill_labels=skill_labels)
        accuracy.append(out.router_stats["skill_accuracy"].mean().item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert accuracy[0] < 0.5 and accuracy[-1] > 0.9, accuracy  # chance: 2 of 6 experts
