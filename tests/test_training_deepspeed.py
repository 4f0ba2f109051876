"""DeepSpeed on CPU, single process (gloo): ZeRO-2 and ZeRO-3 runs of the tiny pipeline reproduce plain PyTorch,
ZeRO-3 really partitions the fused expert weights (and gradient checkpointing keeps the result), and a stage
interrupted mid-way resumes from its last checkpoint to the same result as an uninterrupted run."""
from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback

from tests.training_helpers import (STAGES, ZERO2, ZERO3, CrashAfter, FakeCrash, baseline_run, finite, initial_weights, load_weights, max_diff,
                                    session_pool, tiny_config)


pytestmark = pytest.mark.usefixtures("one_thread")


class ZeroProbe(TrainerCallback):
    """Records, after each optimizer step, how ZeRO holds the first MoE layer's fused expert weights."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)
        experts = model.moe_blocks()[0].experts
        p = experts.gate_up_proj
        self.seen.append({"zero3": hasattr(p, "ds_id"), "local_numel": p.numel(), "full_numel": int(getattr(p, "ds_numel", p.numel())),
                          "shape": tuple(getattr(p, "ds_shape", p.shape)), "checkpointing": bool(model.is_activation_checkpointing)})


def _losses(out, stage):
    rows = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "router" in r]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_runs_match_plain_pytorch(zero, tmp_path_factory, tmp_path):
    from training.runner import run_training

    base_out, _ = baseline_run(tmp_path_factory)
    pool, manifests = session_pool(tmp_path_factory)
    ds = ZERO2 if zero == "zero2" else ZERO3
    # ZeRO-3 also with gradient checkpointing: recomputation must gather the partitioned experts again
    cfg = tiny_config(tmp_path, pool, manifests, deepspeed=ds, **{"run.gradient_checkpointing": zero == "zero3"})
    probe = ZeroProbe()
    result = run_training(cfg, callbacks=[probe], progress=False)
    assert [result["stages"][s]["steps"] for s in STAGES] == [3, 3, 3]
    assert all(r["shape"] == (4, 2 * 512, 192) for r in probe.seen) and len(probe.seen) == 9
    if zero == "zero3":  # partitioned: outside forward/backward the process holds no expert weights at all
        assert all(r["zero3"] and r["local_numel"] == 0 and r["full_numel"] == 4 * 1024 * 192 for r in probe.seen)
        assert all(r["checkpointing"] for r in probe.seen)
    else:
        assert not any(r["zero3"] for r in probe.seen) and all(r["local_numel"] == 4 * 1024 * 192 for r in probe.seen)
    start = initial_weights(cfg)
    for stage in STAGES:
        assert _losses(tmp_path, stage) == pytest.approx(_losses(base_out, stage), rel=1e-5)
        plain = load_weights(base_out / stage / "final")
        # float summation orders differ, and Adam turns a tiny gradient's rounding difference into up to a
        # learning-rate-sized step (m / sqrt(v) ~ +-1): so a few weights may differ by a few % of the movement, while
        # the bulk must agree far below it (a stage that trained the wrong weights would differ by ~100 %)
        got = load_weights(tmp_path / stage / "final")
        moved, diff = max_diff(plain, start), max_diff(got, plain)
        assert 1e-4 < moved and diff < 0.1 * moved, (stage, diff, moved)
        moved_sum = sum(float((plain[k].float() - start[k].float()).abs().sum()) for k in plain)
        diff_sum = sum(float((got[k].float() - plain[k].float()).abs().sum()) for k in plain)
        assert diff_sum < 1e-3 * moved_sum, (stage, diff_sum, moved_sum)
        start = plain


def test_interrupted_stage_resumes_to_the_uninterrupted_result(tmp_path_factory, tmp_path):
    """ZeRO-2: a crash after step 3 of 4 (checkpoints every 2 steps) -> re-run resumes from checkpoint-2."""
    from training.checkpoints import last_checkpoint, stage_done
    from training.runner import run_training

    pool, manifests = session_pool(tmp_path_factory)

    def cfg(out):
        return tiny_config(out, pool, manifests, deepspeed=ZERO2, steps=4, only=("skill_tune",))

    crashed, whole = tmp_path / "crashed", tmp_path / "whole"
    with pytest.raises(FakeCrash):
        run_training(cfg(crashed), callbacks=[CrashAfter(3)], progress=False)
    stage_dir = crashed / "skill_tune"
    assert not stage_done(stage_dir) and last_checkpoint(stage_dir).name == "checkpoint-2"
    assert [r["step"] for r in map(json.loads, (stage_dir / "log.jsonl").read_text().splitlines())] == [1, 2, 3]
    assert (last_checkpoint(stage_dir) / "global_step2").is_dir()  # DeepSpeed's own optimizer state
    result = run_training(cfg(crashed), progress=False)
    summary = result["stages"]["skill_tune"]
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("checkpoint-2") and finite(summary["last_loss"])
    rows = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "router" in r]
    assert steps == [1, 2, 3, 4]  # the crashed run's step-3 row was dropped and written again
    run_training(cfg(whole), progress=False)
    assert _losses(crashed, "skill_tune") == pytest.approx(_losses(whole, "skill_tune"), rel=1e-5)
    assert max_diff(load_weights(stage_dir / "final"), load_weights(whole / "skill_tune" / "final")) < 1e-5
    # a finished stage is skipped on the next run
    again = run_training(cfg(crashed), progress=False)
    assert again["stages"]["skill_tune"]["steps"] == 4


def test_head_decoder_under_zero2_matches_plain_pytorch_and_keeps_the_refit(tmp_path_factory, tmp_path):
    """The planning head's loss and its post-stage refit through the DeepSpeed engine (which wraps the model and has a
    `.config` of its own): the same losses, plan losses, refit and exported head as plain PyTorch."""
    from training.runner import run_training

    pool, manifests = session_pool(tmp_path_factory)
    over = {"model.preset_args": {"trajectory_decoder": "head"}, "stages.skill_tune.plan_refit": {"steps": 20}}
    runs = {}
    for name, ds in (("plain", None), ("zero2", ZERO2)):
        cfg = tiny_config(tmp_path / name, pool, manifests, deepspeed=ds, steps=2, only=("skill_tune",), **over)
        runs[name] = run_training(cfg, progress=False)["stages"]["skill_tune"]
    rows = {n: [json.loads(line) for line in (tmp_path / n / "skill_tune" / "log.jsonl").read_text().splitlines()] for n in runs}
    plan = {n: [r["plan_loss"] for r in rows[n] if "plan_loss" in r] for n in runs}
    assert len(plan["plain"]) == 2 and any(v > 0 for v in plan["plain"])  # a batch may hold no plan item
    assert plan["zero2"] == pytest.approx(plan["plain"], rel=1e-5)
    assert _losses(tmp_path / "zero2", "skill_tune") == pytest.approx(_losses(tmp_path / "plain", "skill_tune"), rel=1e-5)
    refit = {n: runs[n]["plan_refit"] for n in runs}
    assert refit["plain"]["steps"] == 20 and refit["plain"]["loss_after"] < refit["plain"]["loss_before"]
    assert refit["zero2"]["loss_after"] == pytest.approx(refit["plain"]["loss_after"], rel=1e-3)
    head = {n: {k: v for k, v in load_weights(tmp_path / n / "skill_tune" / "final").items() if k.startswith("plan_head.")} for n in runs}
    assert head["plain"] and max_diff(head["zero2"], head["plain"]) < 1e-3
