"""The planning head's full-batch refit on frozen features (mose/plan_head_fit.py): feature collection agrees with the
model's own forward pass, the refit lowers the loss to what a linear readout can reach, bad input is refused, and a
stage's `plan_refit` runs it and keeps the refit head in the exported checkpoint."""
import json

import pytest
import torch

from datasets_cfg.schema import ScenePool
from datasets_cfg.skill_items import pool_items
from mose.plan_head_fit import fit_plan_head, plan_inputs
from mose.skill_data import SkillCollator, build_skill_dataset
from mose.skills import Taxonomy
from mose.trajectory_decoders import PlanningHead, constant_velocity_prior
from tests.skill_fixtures import driving_row, llava_processor, write_image

TAX = Taxonomy.load()


def _smooth_l1(d: torch.Tensor) -> float:  # Huber with beta 1, written out: 0.5 d^2 below 1, |d| - 0.5 above
    a = d.abs()
    return float(torch.where(a < 1, 0.5 * a ** 2, a - 0.5).mean())


def test_refit_starts_at_the_prior_and_fits_a_linear_residual():
    torch.manual_seed(0)
    hidden, n = 16, 96
    x = torch.randn(n, 2 * hidden + 1)
    speed = torch.rand(n) * 10
    prior = constant_velocity_prior(speed)
    w = torch.randn(2 * hidden + 1, 16) * 0.3
    targets = prior + (x @ w).view(n, 8, 2)  # the residual is linear in the features: a readout can reach ~0 loss
    head = PlanningHead(hidden)
    stats = fit_plan_head(head, x, prior, targets, steps=400, lr=1e-2)
    # the head starts with a zero residual: its loss is the smooth-L1 of targets - prior itself
    assert stats["loss_before"] == pytest.approx(_smooth_l1(targets - prior), abs=1e-5)
    assert stats["items"] == n and stats["steps"] == 400
    assert stats["loss_after"] < 0.05 * stats["loss_before"]
    with torch.no_grad():
        assert _smooth_l1(head(x) - (targets - prior)) == pytest.approx(stats["loss_after"], abs=1e-5)  # stats rounded to 5 decimals


def test_zero_steps_change_nothing_and_bad_arguments_are_refused():
    head = PlanningHead(4)
    x, prior = torch.randn(5, 9), torch.zeros(5, 8, 2)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    stats = fit_plan_head(head, x, prior, prior + 1, steps=0)
    assert stats["loss_before"] == stats["loss_after"]
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    for bad in ({"steps": -1}, {"lr": 0.0}, {"weight_decay": -0.1}):
        with pytest.raises(ValueError, match="fit_plan_head"):
            fit_plan_head(head, x, prior, prior, **bad)


def _tiny_model_for(processor, **overrides):
    """The tiny preset with the test tokenizer's vocabulary and image token (as training.model_setup builds it)."""
    from mose.config import MoSEConfig
    from mose.modeling import MoSEForConditionalGeneration
    from mose.presets import _get, base_config

    base = base_config("tiny")
    base.text_config.vocab_size = len(processor.tokenizer)
    base.image_token_index = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    config = MoSEConfig(base_config=base, **{**_get("tiny").moe_options, **overrides})
    torch.manual_seed(0)
    return MoSEForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def dataset_and_collator(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rows = [driving_row(f"s{i}", image=write_image(d / f"s{i}.png", seed=i), lane_change=i == 1) for i in range(3)]
    items, _ = pool_items(ScenePool.from_rows(rows), TAX)
    proc = llava_processor()
    ds, _ = build_skill_dataset(items, proc, TAX)
    return ds, SkillCollator(proc, plan=True)


@pytest.mark.usefixtures("one_thread")
def test_collected_features_give_the_models_own_plan_loss(dataset_and_collator):
    from mose.trajectory_decoders import plan_loss

    ds, collate = dataset_and_collator
    model = _tiny_model_for(collate.processor, trajectory_decoder="head")
    torch.nn.init.normal_(model.plan_head.fc_out.weight, std=0.1)  # a head that predicts something other than 0
    feats, prior, targets = plan_inputs(model, ds, collate, batch_size=2)  # batch 2: items split over passes
    batch = collate([ds[i] for i in range(len(ds))])
    hier = int((batch["plan_index"] >= 0).sum())
    assert hier == 3 and feats.shape == (3, 2 * model.plan_head.fc_out.in_features + 1)
    torch.testing.assert_close(prior, constant_velocity_prior(torch.full((3,), 8.0)))
    keep = batch["plan_index"] >= 0
    torch.testing.assert_close(targets, batch["plan_targets"][keep])
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "skill_labels"})  # the whole batch at once, padded differently: the same loss
        mine = plan_loss(model.plan_head(feats), prior, targets, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(mine, out.plan_loss, rtol=1e-4, atol=1e-6)


def test_a_model_without_a_head_is_refused(dataset_and_collator):

    ds, collate = dataset_and_collator
    with pytest.raises(ValueError, match="no planning head"):
        plan_inputs(_tiny_model_for(collate.processor), ds, collate)


@pytest.mark.usefixtures("one_thread")
def test_a_stage_with_plan_refit_refits_and_exports_the_refit_head(tmp_path_factory, tmp_path):
    from tests.training_helpers import CaptureMerged, load_weights, session_pool, tiny_config
    from training.config import ConfigError
    from training.runner import run_training

    pool, manifests = session_pool(tmp_path_factory)
    over = {"model.preset_args": {"trajectory_decoder": "head"}, "stages.router_pretrain.plan_refit": {"steps": 60}}
    cfg = tiny_config(tmp_path, pool, manifests, steps=1, only=("router_pretrain",), **over)
    capture = CaptureMerged()
    summary = run_training(cfg, callbacks=[capture], progress=False)["stages"]["router_pretrain"]
    refit = summary["plan_refit"]
    assert refit["steps"] == 60 and refit["items"] > 0 and refit["loss_after"] < refit["loss_before"]
    saved = json.loads((tmp_path / "router_pretrain" / "final" / "stage_summary.json").read_text())
    assert saved["plan_refit"] == refit
    # the export holds the model as joint training left it, except for the head, which the refit moved
    (_, _, trained), exported = capture.models[0], load_weights(tmp_path / "router_pretrain" / "final")
    head = [k for k in trained if k.startswith("plan_head.")]
    assert head and all(k in exported for k in trained)
    assert any(not torch.equal(trained[k], exported[k]) for k in head)
    assert all(torch.equal(trained[k], exported[k]) for k in trained if k not in head)
    with pytest.raises(ConfigError, match="plan_refit"):
        tiny_config(tmp_path / "bad", pool, manifests, **{"stages.router_pretrain.plan_refit": {"steps": -1}})
