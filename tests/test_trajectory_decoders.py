"""Trajectory decoders (mose/trajectory_decoders.py): the constant-velocity prior, the planning head, its loss and
training, the poses written back into the answer, the collator's planning inputs, config and checkpoint round trip."""
import json
import math

import numpy as np
import pytest
import torch

from datasets_cfg.schema import ScenePool
from datasets_cfg.skill_items import pool_items
from mose.skill_data import IGNORE, SkillCollator, build_skill_dataset
from mose.skill_format import parse_answer
from mose.skills import Taxonomy
from mose.trajectory_decoders import (SPEED_SCALE, HeadDecoder, PlanningHead, constant_velocity_prior, make_decoder, plan_features, plan_loss,
                                      write_trajectory)
from tests.skill_fixtures import driving_row, llava_processor, write_image

TAX = Taxonomy.load()
ANSWER = ("<perception>\n[vehicles] A white car 12 m ahead.\n</perception>\n<prediction>\n[agent_intent] It brakes.\n</prediction>\n"
          "<planning>\n[longitudinal_control] Slow down.\n[trajectory] [(1.00, 0.00), (2.00, 0.00), (3.00, 0.00), (4.00, 0.00), "
          "(5.00, 0.00), (6.00, 0.00), (7.00, 0.00), (8.00, 0.00)]\n</planning>")


def _tiny_head_model(seed=0):
    from mose.presets import build_preset

    return build_preset("tiny", seed=seed, trajectory_decoder="head")


def test_constant_velocity_prior_by_hand():
    # 8 m/s, poses 0.5 s apart: x = 8 * 0.5 k = 4, 8, ..., 32; y = 0 (ego frame, x forward)
    prior = constant_velocity_prior([8.0, 0.0])
    assert prior.shape == (2, 8, 2)
    np.testing.assert_allclose(prior[0, :, 0].numpy(), [4, 8, 12, 16, 20, 24, 28, 32])
    np.testing.assert_allclose(prior[0, :, 1].numpy(), np.zeros(8))
    np.testing.assert_allclose(prior[1].numpy(), np.zeros((8, 2)))


def test_head_shape_and_zero_residual_gives_the_prior():
    head = PlanningHead(16)
    assert head(torch.randn(3, 33)).shape == (3, 8, 2)  # [plan token, prompt mean, speed]: 2 * 16 + 1
    model = _tiny_head_model().eval()
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the plan token is still the last position
    out = model(input_ids=ids, attention_mask=mask, ego_speed=torch.tensor([8.0, 2.0]))
    np.testing.assert_allclose(out.plan_poses[0, :, 0].detach().numpy(), [4, 8, 12, 16, 20, 24, 28, 32], atol=1e-6)
    np.testing.assert_allclose(out.plan_poses[1, :, 0].detach().numpy(), np.arange(1, 9) * 1.0, atol=1e-6)
    np.testing.assert_allclose(out.plan_poses[:, :, 1].detach().numpy(), np.zeros((2, 8)), atol=1e-6)
    assert out.plan_loss is None and out.loss is None


def test_plan_features_are_the_plan_token_the_prompt_mean_and_the_scaled_speed():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # row 1 left-padded
    index = torch.tensor([2, 3])  # row 0: plan token at position 2, position 3 after it is not averaged
    feats = plan_features(hidden, index, mask, torch.tensor([20.0, float("nan")]))
    assert feats.shape == (2, 7)
    # row 0: token 2 = [6, 7, 8]; mean of positions 0..2 = [3, 4, 5]; 20 m/s / SPEED_SCALE
    np.testing.assert_allclose(feats[0].numpy(), [6, 7, 8, 3, 4, 5, 20.0 / SPEED_SCALE])
    # row 1: token 3 = [21, 22, 23]; mean of the attended positions 1..3 = [18, 19, 20]; NaN speed -> 0
    np.testing.assert_allclose(feats[1].numpy(), [21, 22, 23, 18, 19, 20, 0.0])


def test_plan_loss_by_hand_and_mask():
    # smooth-L1 with beta 1: |d| < 1 -> 0.5 d^2, else |d| - 0.5 (torch.nn.SmoothL1Loss definition)
    residual = torch.zeros(2, 8, 2)
    prior = torch.zeros(2, 8, 2)
    targets = torch.stack([torch.full((8, 2), 0.5), torch.full((8, 2), 3.0)])
    loss = plan_loss(residual, prior, targets, torch.tensor([True, True]))
    assert float(loss) == pytest.approx((0.5 * 0.25 + 2.5) / 2)
    assert float(plan_loss(residual, prior, targets, torch.tensor([False, True]))) == pytest.approx(2.5)
    assert float(plan_loss(residual, prior, targets, torch.tensor([False, False]))) == 0.0


def test_written_poses_parse_back_to_the_same_poses():
    xy = np.array([[4.004, 0.011], [8.1, -0.2], [12.0, 0.3], [16.2, 0.5], [20.0, 0.7], [24.5, 1.0], [28.0, 1.2], [31.99, 1.456]])
    for answer in (ANSWER, ANSWER.replace(ANSWER[ANSWER.index("[trajectory]"):ANSWER.index("</planning>")], ""), ""):
        text = write_trajectory(answer, xy)
        parsed = parse_answer(text, TAX)
        np.testing.assert_allclose(parsed.trajectory, np.round(xy, 2), atol=1e-9)
        assert text.count("[trajectory]") == 1
    poses, info = HeadDecoder(TAX).poses(ANSWER, {"plan_xy": xy})
    np.testing.assert_allclose(poses[:, :2], np.round(xy, 2))
    assert info["format_ok"] and "(4.00, 0.01)" in info["answer"] and "[longitudinal_control] Slow down." in info["answer"]
    # the text decoder reads the original decimals; headings along x are 0
    poses, info = make_decoder("text", TAX).poses(ANSWER)
    np.testing.assert_allclose(poses, np.column_stack([np.arange(1, 9.0), np.zeros(8), np.zeros(8)]))
    assert "answer" not in info
    poses, info = HeadDecoder(TAX).poses(ANSWER, {"plan_xy": np.full((8, 2), np.nan)})
    assert poses is None and "non-finite" in info["reason"]


def test_prompt_ego_speed_reads_the_hierarchical_prompt():
    from datasets_cfg.skill_items import hierarchical_prompt
    from mose.trajectory_decoders import prompt_ego_speed

    row = driving_row("s0")
    row["ego"]["speed"] = [0.0] * row["current_index"] + [12.34] + [0.0] * (len(row["ego"]["speed"]) - row["current_index"] - 1)
    assert prompt_ego_speed(hierarchical_prompt(row, TAX)) == pytest.approx(12.3)  # the prompt prints one decimal
    row["ego"]["speed"] = []
    assert np.isnan(prompt_ego_speed(hierarchical_prompt(row, TAX)))
    assert np.isnan(prompt_ego_speed("What is ahead?"))


def test_decoder_choice_is_validated():
    from mose.presets import preset_config

    with pytest.raises(ValueError, match="trajectory_decoder.*'text', 'head'"):
        preset_config("tiny", trajectory_decoder="tokens")
    with pytest.raises(ValueError, match="plan_loss_coef"):
        preset_config("tiny", trajectory_decoder="head", plan_loss_coef=-1.0)
    assert preset_config("tiny").trajectory_decoder == "text"


def test_text_decoder_model_rejects_planning_inputs_and_has_no_head():
    from mose.presets import build_preset

    model = build_preset("tiny")
    assert model.plan_head is None and not any("plan_head" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="trajectory_decoder is 'text'"):
        model(input_ids=torch.randint(5, 100, (1, 6)), ego_speed=torch.tensor([3.0]))


def test_save_load_keeps_the_decoder_and_the_head_weights(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = _tiny_head_model()
    with torch.no_grad():
        model.plan_head.fc_out.weight.normal_()
    model.save_pretrained(tmp_path / "ck")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ck")
    assert loaded.config.trajectory_decoder == "head"
    for k, v in model.plan_head.state_dict().items():
        torch.testing.assert_close(loaded.plan_head.state_dict()[k], v, rtol=0, atol=0)


def test_a_few_steps_lower_the_head_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = _tiny_head_model().train()
    ids = torch.randint(5, 100, (4, 10))
    speed = torch.tensor([8.0, 4.0, 0.0, 10.0])
    # targets: the prior plus a per-row lateral drift (a lane change to the left for rows 0 and 3)
    drift = torch.tensor([1.0, 0.0, 0.0, 2.0])[:, None] * torch.linspace(0.25, 2.0, 8)[None, :]
    targets = constant_velocity_prior(speed).clone()
    targets[:, :, 1] = drift
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(input_ids=ids, ego_speed=speed, plan_index=torch.full((4,), 9), plan_targets=targets)
        losses.append(float(out.plan_loss.detach()))
        out.plan_loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]


@pytest.fixture(scope="module")
def planning_batch(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rows = [driving_row(f"s{i}", image=write_image(d / f"s{i}.png", seed=i), lane_change=i == 1) for i in range(2)]
    items, rep = pool_items(ScenePool.from_rows(rows), TAX)
    proc = llava_processor()
    ds, _ = build_skill_dataset(items, proc, TAX)
    feats = [ds[i] for i in range(len(ds))]
    return feats, SkillCollator(proc, plan=True)(feats), SkillCollator(proc)(feats)


def test_collator_carries_prior_targets_and_the_plan_token(planning_batch):
    feats, batch, plain = planning_batch
    assert not {"ego_speed", "plan_index", "plan_targets"} & set(plain)  # without plan: the batch is as before
    for k in plain:
        torch.testing.assert_close(batch[k], plain[k], rtol=0, atol=0)
    hier = [b for b, f in enumerate(feats) if f["kind"] == "hierarchical"]
    assert len(hier) == 2
    for b, f in enumerate(feats):
        if b not in hier:  # QA items (even the trajectory QA: another prompt) have no planning target
            assert int(batch["plan_index"][b]) == -1 and torch.isnan(batch["ego_speed"][b])
            continue
        i = int(batch["plan_index"][b])
        labels = batch["labels"][b]
        assert labels[i] == IGNORE and labels[i + 1] != IGNORE and bool((labels[:i + 1] == IGNORE).all())
        assert float(batch["ego_speed"][b]) == pytest.approx(8.0)  # driving_row's ego speed at the current frame
        want = parse_answer(f["target"], TAX).trajectory
        np.testing.assert_allclose(batch["plan_targets"][b].numpy(), want, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_a_head_decoder_stage_trains_the_head_through_the_runner(tmp_path_factory, tmp_path):
    """`model.preset_args.trajectory_decoder: head`: the stage trains the plan_head group, logs plan_loss, and the
    exported checkpoint (plain from_pretrained) keeps the decoder and a head that moved off its zero init."""
    from transformers import AutoModelForImageTextToText

    from tests.training_helpers import session_pool, tiny_config
    from training.runner import run_training

    pool, manifests = session_pool(tmp_path_factory)
    cfg = tiny_config(tmp_path, pool, manifests, steps=2, only=("router_pretrain",),
                      **{"model.preset_args": {"trajectory_decoder": "head"}, "run.logging_steps": 1})
    summary = run_training(cfg, progress=False)["stages"]["router_pretrain"]
    rows = summary["trainable"]
    assert rows["plan_head"][1] == rows["plan_head"][0] > 0
    logs = [json.loads(line) for line in (tmp_path / "router_pretrain" / "log.jsonl").read_text().splitlines()]
    plan = [r["plan_loss"] for r in logs if "plan_loss" in r]
    assert plan and all(math.isfinite(v) and v > 0 for v in plan)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "router_pretrain" / "final")
    assert model.config.trajectory_decoder == "head"
    assert float(model.plan_head.fc_out.weight.detach().abs().sum()) > 0


def test_model_planner_with_a_head_checkpoint_plans_the_prior_and_writes_it_into_the_answer(tmp_path):
    """An untrained head (residual 0) through eval/vlm_planner.ModelPlanner: the poses are the constant-velocity prior
    of the prompt's 8.0 m/s, and the recorded answer's trajectory line says so."""
    from datasets_cfg.schema import Scene
    from eval.vlm_planner import ModelPlanner, checkpoint_decoder
    from mose.presets import build_preset, preset_config
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer

    cfg = preset_config("tiny", trajectory_decoder="head")
    text = cfg.get_text_config(decoder=True)
    tok = train_chat_tokenizer([ANSWER] * 4, text.vocab_size, image_token_id=cfg.base_config.image_token_id)
    ck = tmp_path / "ck"
    build_preset("tiny", trajectory_decoder="head").save_pretrained(ck)
    llava_processor_for(cfg, tok).save_pretrained(ck)
    assert checkpoint_decoder(ck) == "head" and checkpoint_decoder(tmp_path) == "text"
    scene = Scene(driving_row("s0", image=write_image(tmp_path / "s0.png", seed=0)), None)
    planner = ModelPlanner(ck, max_new_tokens=4, taxonomy=TAX, constrained=False)  # the head path; the grammar has its own tests
    poses = planner(scene)
    np.testing.assert_allclose(poses[:, 0], [4, 8, 12, 16, 20, 24, 28, 32])
    np.testing.assert_allclose(poses[:, 1:], np.zeros((8, 2)))
    answer = planner.decisions_[-1]["answer"]
    np.testing.assert_allclose(parse_answer(answer, TAX).trajectory, poses[:, :2])
    planner.close()


def test_model_planner_without_answers_plans_the_same_poses_and_refuses_text_checkpoints(tmp_path):
    """`answer=False`: the head's poses from the prompt's forward pass alone equal those planned with the answer
    generated (the head never reads the answer), no answer is recorded, and 0 tokens are generated; a "text"
    checkpoint cannot plan without an answer."""
    from datasets_cfg.schema import Scene
    from eval.vlm_planner import ModelPlanner
    from mose.presets import build_preset, preset_config
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer

    cfg = preset_config("tiny", trajectory_decoder="head")
    tok = train_chat_tokenizer([ANSWER] * 4, cfg.get_text_config(decoder=True).vocab_size, image_token_id=cfg.base_config.image_token_id)
    ck, text_ck = tmp_path / "ck", tmp_path / "text"
    model = build_preset("tiny", trajectory_decoder="head")
    with torch.no_grad():  # a head that plans something other than the prior
        model.plan_head.fc_out.weight.normal_(std=0.5)
    model.save_pretrained(ck)
    llava_processor_for(cfg, tok).save_pretrained(ck)
    build_preset("tiny").save_pretrained(text_ck)
    llava_processor_for(cfg, tok).save_pretrained(text_ck)
    scene = Scene(driving_row("s0", image=write_image(tmp_path / "s0.png", seed=0)), None)
    with_answer = ModelPlanner(ck, max_new_tokens=4, taxonomy=TAX, constrained=False)
    without = ModelPlanner(ck, max_new_tokens=4, taxonomy=TAX, constrained=False, answer=False)
    a, b = with_answer(scene), without(scene)
    assert not np.allclose(a[:, :2], constant_velocity_prior([8.0])[0].numpy(), atol=0.05)
    np.testing.assert_array_equal(a, b)
    assert with_answer.decisions_[-1]["new_tokens"] == 4  # unconstrained greedy fills the 4-token budget (no eos is learned)
    assert without.decisions_[-1]["answer"] is None and without.decisions_[-1]["new_tokens"] == 0
    with pytest.raises(ValueError, match="only 'head' checkpoints"):
        ModelPlanner(text_ck, max_new_tokens=4, taxonomy=TAX, answer=False).load()
    with_answer.close()
    without.close()
