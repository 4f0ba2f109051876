"""Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437, Sec. 2.1.2): selection bias, update rule, accumulation,
checkpoints. Expected values are derived by hand from the paper's rule b_i += gamma * sign(mean_load - load_i)."""
from __future__ import annotations

import math

import pytest
import torch

from mose.config import MoSEConfig
from mose.moe import MoSERouter, load_balance_loss, update_aux_free_bias
from mose.presets import build_preset


def _router(E=4, H=8, k=2, seed=0):
    torch.manual_seed(seed)
    return MoSERouter(H, E, k, balancing="aux_free")


def test_bias_changes_the_choice_but_not_the_gate_values():
    r = _router()
    x = torch.randn(64, 8)
    _, _, top_i0 = r(x)
    r.expert_bias.copy_(torch.tensor([-1.0, -1.0, 1.0, 1.0]))  # forces experts {2, 3} for every token
    logits, top_w, top_i = r(x)
    assert sorted(set(top_i.reshape(-1).tolist())) == [2, 3]
    assert not torch.equal(top_i0.sort(-1).values, top_i.sort(-1).values)
    # reference: the UNBIASED softmax (by hand) of the chosen experts, renormalised over them
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    p = e / e.sum(-1, keepdim=True)
    chosen = p.gather(1, top_i)
    torch.testing.assert_close(top_w, chosen / chosen.sum(-1, keepdim=True))


def test_aux_free_state_keeps_its_precision_when_the_model_is_cast():
    r = _router().to(torch.bfloat16)
    assert r.weight.dtype == torch.bfloat16
    assert r.expert_bias.dtype == torch.float32 and r.load_counts.dtype == torch.float64
    r.expert_bias.fill_(0.1)
    r.load_counts.copy_(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    update_aux_free_bias(r, 0.001)
    torch.testing.assert_close(r.expert_bias, torch.tensor([0.099, 0.1, 0.101, 0.101]))
    _, top_w, top_i = r(torch.randn(5, 8, dtype=torch.bfloat16))
    assert top_i.shape == (5, 2)


def test_update_rule_hand_case():
    r = _router()
    r.load_counts.copy_(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert update_aux_free_bias(r, 0.001) == 1
    # mean load 1: expert 0 overloaded (-gamma), expert 1 at the mean (sign 0), experts 2, 3 underloaded (+gamma)
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.001, 0.0, 0.001, 0.001]))
    assert r.load_counts.sum() == 0  # counts are reset after the update
    assert update_aux_free_bias(r, 0.001) == 0  # no tokens seen: no move
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.001, 0.0, 0.001, 0.001]))


def test_bias_updates_alone_drive_a_skewed_router_toward_uniform():
    E, k = 4, 2
    r = _router(E=E, k=k)
    with torch.no_grad():  # strongly skewed init: experts 0 and 1 win for most tokens
        r.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        r.weight[:, 0] += torch.tensor([3.0, 2.5, 0.0, -1.0])
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    x[:, 0] = x[:, 0].abs() + 0.5

    with torch.no_grad():
        logits, _, top_i = r(x)
    share0 = torch.bincount(top_i.reshape(-1), minlength=E).float() / top_i.numel()
    balance0 = float(load_balance_loss(logits, top_i))
    assert float(share0.max()) * E > 1.6 and balance0 > 1.3  # near-collapsed start
    # no gradient, no aux loss: only the bias moves. Sign updates settle into a small cycle around the balance point,
    # so the load is measured over the last 100 updates.
    load, balance = torch.zeros(E), []
    for step in range(600):
        with torch.no_grad():
            logits, _, top_i = r(x)
        if step >= 500:
            load += torch.bincount(top_i.reshape(-1), minlength=E).float()
            balance.append(float(load_balance_loss(logits, top_i)))
        r.count_load(top_i)
        update_aux_free_bias(r, 0.002)
    share = load / load.sum()
    assert float(share.max()) * E < 1.15 and float(share.min()) * E > 0.85
    assert sum(balance) / len(balance) < 1.05 < balance0


def _tiny(**kw):
    return build_preset("tiny", balancing="aux_free", aux_free_rate=0.001, **kw)


def _batch(n, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_two_micro_batches_accumulate_into_one_update_like_the_concatenated_batch():
    a, b = _batch(2, seed=1), _batch(2, seed=2)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    m1, m2 = _tiny().train(), _tiny().train()
    with torch.no_grad():
        m1(**a)
        m1(**b)
        m2(**both)
    counts1 = [blk.router.load_counts.clone() for blk in m1.moe_blocks()]
    counts2 = [blk.router.load_counts.clone() for blk in m2.moe_blocks()]
    for c1, c2 in zip(counts1, counts2):
        assert c1.sum() == 2 * 2 * 12 * m1.config.num_experts_per_tok
        torch.testing.assert_close(c1, c2)
    update_aux_free_bias(m1, 0.001)
    update_aux_free_bias(m2, 0.001)
    for b1, b2, c in zip(m1.moe_blocks(), m2.moe_blocks(), counts1):
        torch.testing.assert_close(b1.router.expert_bias, b2.router.expert_bias)
        torch.testing.assert_close(b1.router.expert_bias, (0.001 * torch.sign(c.mean() - c)).float())
    m1.eval()
    with torch.no_grad():
        m1(**a)  # evaluation forwards never count
    assert all(blk.router.load_counts.sum() == 0 for blk in m1.moe_blocks())


def test_trainer_updates_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    from transformers import TrainingArguments, default_data_collator

    from training.trainer import MoSETrainer

    items = _batch(4, seed=3)
    data = [{k: v[i] for k, v in items.items()} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=0.0, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1000, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = _tiny().train()
    MoSETrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    ref = _tiny().train()
    with torch.no_grad():
        ref(**items)
    counts = [blk.router.load_counts.clone() for blk in ref.moe_blocks()]
    update_aux_free_bias(ref, 0.001)
    for got, want, c in zip(model.moe_blocks(), ref.moe_blocks(), counts):
        # one update (each bias entry in {-gamma, 0, +gamma}) from the counts of both micro-batches
        torch.testing.assert_close(got.router.expert_bias, want.router.expert_bias)
        assert float(c.sum()) > 0 and float(got.router.expert_bias.abs().sum()) > 0


def test_bias_is_saved_and_loaded_with_the_checkpoint(tmp_path):
    from transformers import AutoModelForImageTextToText

    import mose  # noqa: F401  (registers the MoSE classes)

    m = _tiny()
    for i, blk in enumerate(m.moe_blocks()):
        blk.router.expert_bias.copy_(torch.tensor([0.01 * (i + 1), -0.02, 0.0, 0.03])[: m.config.num_experts])
    assert any(k.endswith("router.expert_bias") for k in m.state_dict())
    assert not any(k.endswith("load_counts") for k in m.state_dict())
    m.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.config.balancing == "aux_free" and loaded.config.aux_free_rate == 0.001
    for a, b in zip(m.moe_blocks(), loaded.moe_blocks()):
        torch.testing.assert_close(a.router.expert_bias, b.router.expert_bias)


def test_default_router_has_no_bias_and_config_is_validated():
    m = build_preset("tiny")
    assert m.config.balancing == "aux_loss"
    assert not any("expert_bias" in k or "load_counts" in k for k in m.state_dict())
    base = m.config.base_config
    with pytest.raises(ValueError, match="balancing"):
        MoSEConfig(base_config=base, balancing="bias")
    with pytest.raises(ValueError, match="aux_free_rate"):
        MoSEConfig(base_config=base, balancing="aux_free", aux_free_rate=-1.0)
    assert math.isclose(MoSEConfig(base_config=base).aux_free_rate, 1e-3)
