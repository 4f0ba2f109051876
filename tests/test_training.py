"""Training stages on the tiny preset with plain PyTorch: exact trainable sets, what each stage changes, loss on a
fixed batch, safetensors checkpoints through plain transformers (LoRA merged as peft merges it), JSONL / TensorBoard
logs with per-layer routing statistics."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tests.training_helpers import STAGES, baseline_run, changed, finite, load_weights, session_pool, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return baseline_run(tmp_path_factory)


@pytest.fixture(scope="module")
def setup(run, tmp_path_factory):
    """The run's config, processor, taxonomy and tokenised stage data (rebuilt the way the runner builds them)."""
    from mose.skills import load_taxonomy
    from training.data import prepare_stage_data
    from training.model_setup import load_processor

    out, _ = run
    pool, manifests = session_pool(tmp_path_factory)
    cfg = tiny_config(out, pool, manifests)
    processor = load_processor(out / "processor")
    tax = load_taxonomy(None)
    return cfg, processor, tax, prepare_stage_data(cfg, processor, tax)


def initial_model(setup):
    from training.model_setup import initial_model as build

    cfg, processor, tax, _ = setup
    return build(cfg, tax, processor)


# ----------------------------------------------------------------------------------------------
# what trains


def test_trainable_sets_are_exact_module_groups(setup):
    from training.checkpoints import inject_lora
    from training.config import LoraConfig
    from training.stages import STAGES as SPECS, apply_trainable

    model = initial_model(setup)
    blocks = model.moe_blocks()
    assert [b.layer_idx for b in blocks] == [0, 2]  # tiny preset: every other layer of 4
    by_id = {id(p): n for n, p in model.named_parameters()}

    def names(modules):
        return {by_id[id(p)] for m in modules for p in m.parameters()}

    expected = {
        "align": names([model.vlm.model.multi_modal_projector]),
        "router_pretrain": names([b.router for b in blocks]),
        "skill_tune": names([b.router for b in blocks] + [b.experts for b in blocks]),
    }
    for stage in STAGES:
        table = apply_trainable(model, SPECS[stage].trainable)
        got = {n for n, p in model.named_parameters() if p.requires_grad}
        assert got == expected[stage], stage
        assert table.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected[stage])
        assert table.total == sum(p.numel() for p in model.parameters())
    # skill tuning with LoRA: the adapters of the decoder's q/k/v/o projections train too, nothing of the vision tower
    inject_lora(model, LoraConfig(r=2, alpha=4))
    apply_trainable(model, list(SPECS["skill_tune"].trainable) + ["lora"])
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 4 * 4 and all("language_model.layers" in n and ".self_attn." in n for n in lora)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected["skill_tune"] | lora


def test_each_stage_changes_only_its_parameters(run, setup):
    out, result = run
    assert [result["stages"][s]["steps"] for s in STAGES] == [3, 3, 3]
    start = {k: v.detach().clone() for k, v in initial_model(setup).state_dict().items()}
    align, router, tune = (load_weights(out / s / "final") for s in STAGES)
    assert changed(start, align) == {k for k in start if "multi_modal_projector" in k}
    assert changed(align, router) == {k for k in start if k.endswith("mlp.router.weight")}
    moved = changed(router, tune)
    experts = {k for k in start if ".mlp.experts." in k}
    attn = {k for k in start if ".self_attn." in k and k.endswith("_proj.weight")}  # LoRA merged into W
    assert experts <= moved and {k for k in start if k.endswith("mlp.router.weight")} <= moved
    assert moved - experts - attn == {k for k in start if k.endswith("mlp.router.weight")}
    assert len(moved & attn) == 16  # q, k, v, o of 4 layers
    assert not any(".bias" in k or "vision_tower" in k or "norm" in k for k in moved)


def test_recipe_resolution_and_groups():
    from training.stages import FROM_SCRATCH_GROUPS, GROUPS, recipe_groups, resolve_recipe

    assert resolve_recipe("auto", random_init=True) == "from_scratch" and resolve_recipe("auto", random_init=False) == "pretrained"
    assert resolve_recipe("pretrained", random_init=True) == "pretrained" and resolve_recipe("from_scratch", random_init=False) == "from_scratch"
    with pytest.raises(ValueError, match="recipe"):
        resolve_recipe("everything", random_init=True)
    assert recipe_groups(["router"], "pretrained") == ["router"]
    # from scratch: everything but the vision tower (and LoRA / "other", which only a stage names itself, and the
    # planning head, which the runner adds where the stage's plan loss counts)
    assert set(recipe_groups(["router"], "from_scratch")) == set(GROUPS) - {"vision_tower", "lora", "other", "plan_head"} == set(FROM_SCRATCH_GROUPS)


def test_random_init_base_trains_the_whole_language_model_by_default(tmp_path_factory, tmp_path):
    """The tiny preset has no pretrained weights, so `model.recipe: auto` resolves to from_scratch: the align stage
    (projector only under the stage recipe) trains every group but the vision tower, says so in its summary, and its
    checkpoint differs from the start in the embeddings, attention, dense FFNs, norms and output head, not in the
    vision tower."""
    from training.runner import run_training

    pool, manifests = session_pool(tmp_path_factory)
    cfg = tiny_config(tmp_path, pool, manifests, steps=2, only=("align",), **{"model.recipe": "auto"})
    summary = run_training(cfg, progress=False)["stages"]["align"]
    assert summary["recipe"] == "from_scratch"
    rows = summary["trainable"]
    assert rows["vision_tower"][1] == 0 and all(rows[g][1] == rows[g][0] > 0 for g in
                                                  ("projector", "embeddings", "attention", "dense_ffn", "router", "experts", "norms", "lm_head"))
    start = {k: v.detach().clone() for k, v in initial_model_of(cfg).state_dict().items()}
    moved = changed(start, load_weights(tmp_path / "align" / "final"))
    assert not any("vision_tower" in k for k in moved)
    for part in ("embed_tokens", ".self_attn.", ".mlp.gate_proj", "norm", "lm_head", "multi_modal_projector"):
        assert any(part in k for k in moved), part


def initial_model_of(cfg):
    """The run's initial model rebuilt from its saved processor (same seed: the weights training started from)."""
    from mose.skills import load_taxonomy
    from training.model_setup import initial_model, load_processor

    return initial_model(cfg, load_taxonomy(cfg.data.taxonomy), load_processor(cfg.run.output_dir + "/processor"))


def _stage_loss(model, batch, losses) -> float:
    from training.trainer import stage_loss_weights

    with torch.no_grad(), stage_loss_weights(model, losses):
        out = model.train()(**batch)  # train mode: the loss the stage optimises (no dropout in the tiny preset)
        return float(losses.lm * out.lm_loss + out.aux_loss)


def test_each_stage_lowers_its_loss_on_its_first_batch(run, setup):
    from mose.modeling import MoSEForConditionalGeneration
    from mose.skill_data import SkillCollator
    from training.data import make_sampler

    out, _ = run
    cfg, processor, tax, data = setup
    collate = SkillCollator(processor)
    before = initial_model(setup)
    for stage in STAGES:
        st = cfg.stages[stage]
        sampler = make_sampler(st, data[stage], tax, cfg.run.seed)
        sampler.set_epoch(0)
        first = list(iter(sampler))[: st.batch_size]
        batch = collate([data[stage].dataset[i] for i in first])
        after = MoSEForConditionalGeneration.from_pretrained(out / stage / "final")
        lb, la = _stage_loss(before, batch, st.losses), _stage_loss(after, batch, st.losses)
        assert math.isfinite(la) and la < lb - 1e-3, (stage, lb, la)
        before = after


# ----------------------------------------------------------------------------------------------
# checkpoints


def test_final_checkpoints_load_with_plain_transformers_equal_to_trained(run, setup):
    """Every stage's safetensors == its trained in-memory model (skill tuning: with peft's own LoRA merge)."""
    import mose.modeling  # noqa: F401 - registers MoSE with the Auto classes
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mose.skill_data import SkillCollator

    out, result = run
    _, _, _, data = setup
    for stage in STAGES:
        final = out / stage / "final"
        loaded = AutoModelForImageTextToText.from_pretrained(final).eval()
        ref_model, ref = result["captured"][stage]
        got = loaded.state_dict()
        assert got.keys() == ref.keys()
        assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-6, stage
    assert any("lora_" in n for n, _ in ref_model.named_parameters())  # skill_tune trained adapters
    processor = AutoProcessor.from_pretrained(final)
    batch = SkillCollator(processor)([data["skill_tune"].dataset[i] for i in range(2)])
    batch.pop("skill_labels")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref_model(**batch).logits, atol=1e-5, rtol=1e-5)
        prompt = {k: v[:1] for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        gen = loaded.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, batch["input_ids"].shape[1] + 3)
    summary = json.loads((final / "stage_summary.json").read_text())
    assert summary["steps"] == 3 and summary["lora"]["r"] == 4 and summary["trainable"]["lora"][1] > 0


# ----------------------------------------------------------------------------------------------
# logs


def test_logs_have_per_layer_routing_statistics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.config import LossConfig

    out, _ = run
    weights = {"align": LossConfig(1.0, 0.0, 0.0, 0.0), "router_pretrain": LossConfig(1.0, 0.01, 0.001, 1.0),
               "skill_tune": LossConfig(1.0, 0.01, 0.001, 0.1)}
    for stage in STAGES:
        rows = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "router" in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        for r in steps:
            st = r["router"]
            assert st["layers"] == [0, 2]
            w = weights[stage]
            mean = {k: sum(st[k]) / len(st[k]) for k in ("balance", "z_loss", "skill_loss")}
            # the logged aux loss is rebuilt from the logged per-layer statistics and the stage's weights
            aux = w.balance * mean["balance"] + w.z * mean["z_loss"] + w.skill * mean["skill_loss"]
            assert r["aux_loss"] == pytest.approx(aux, rel=1e-4, abs=1e-6)
            assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"], rel=1e-5)
            for load in st["expert_load"]:
                assert len(load) == 4 and sum(load) == pytest.approx(1.0, abs=1e-4) and min(load) >= 0
            assert all(0 < b <= 4 for b in st["balance"]) and all(0 <= a <= 1 for a in st["skill_accuracy"])
            assert all(0 <= e <= 1 for e in st["entropy_norm"])
            assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and finite(r["grad_norm"])
        acc = EventAccumulator(str(out / "tensorboard" / stage)).Reload()
        tags = acc.Tags()["scalars"]
        for tag in ("train/loss", "train/tokens_per_s", "router/balance/layer_0", "router/balance/layer_2", "router/balance/mean",
                    "router/skill_accuracy/layer_2", "router/entropy_norm/mean", "router/expert_load/layer_0/expert_3"):
            assert tag in tags, (stage, tag)
        assert [e.step for e in acc.Scalars("router/balance/layer_0")] == [1, 2, 3]
        assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# resume (plain PyTorch; the DeepSpeed resume is in test_training_deepspeed.py)


def _router_pretrain_losses(out):
    """(step, loss) of each logged training step of a run's router_pretrain stage."""
    rows = [json.loads(line) for line in (out / "router_pretrain" / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "router" in r]


def test_interrupted_stage_resumes_exactly_without_deepspeed(tmp_path_factory, tmp_path):
    """Router pretraining (skill-balanced sampler) crashes after step 3 of 4 -> resumes from checkpoint-2 to the same
    losses and weights as an uninterrupted run."""
    from tests.training_helpers import CrashAfter, FakeCrash, max_diff
    from training.runner import run_training

    pool, manifests = session_pool(tmp_path_factory)

    def cfg(out):
        return tiny_config(out, pool, manifests, steps=4, only=("router_pretrain",))

    losses = _router_pretrain_losses
    crashed, whole = tmp_path / "crashed", tmp_path / "whole"
    with pytest.raises(FakeCrash):
        run_training(cfg(crashed), callbacks=[CrashAfter(3)], progress=False)
    summary = run_training(cfg(crashed), progress=False)["stages"]["router_pretrain"]
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("checkpoint-2") and finite(summary["last_loss"])
    run_training(cfg(whole), progress=False)
    assert [s for s, _ in losses(crashed)] == [s for s, _ in losses(whole)] == [1, 2, 3, 4]
    assert [v for _, v in losses(crashed)] == pytest.approx([v for _, v in losses(whole)], rel=1e-6)
    assert max_diff(load_weights(crashed / "router_pretrain" / "final"), load_weights(whole / "router_pretrain" / "final")) < 1e-6


_KILLED_CHILD = r"""
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from tests.training_helpers import tiny_config
from training.runner import run_training

pool, manifests, out, marker, at = sys.argv[1:6]

class WaitForKill(TrainerCallback):  # hold still at a known step (checkpoint-4 written, step 5 done) until killed
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(at):
            Path(marker).write_text(str(state.global_step))
            time.sleep(600)

cfg = tiny_config(Path(out), Path(pool), Path(manifests), steps=6, only=("router_pretrain",))
run_training(cfg, callbacks=[WaitForKill()], progress=False)
"""


def test_stage_killed_with_sigkill_resumes_to_the_same_end(tmp_path_factory, tmp_path):
    """A real kill (SIGKILL to the training process, no exception handlers or atexit run) after step 5 of 6: the
    rerun resumes from checkpoint-4 and ends at step 6 with a finite loss, the losses and weights of an uninterrupted
    run, and one log row per step."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.training_helpers import max_diff
    from training.runner import run_training

    pool, manifests = session_pool(tmp_path_factory)
    killed, whole, marker = tmp_path / "killed", tmp_path / "whole", tmp_path / "at_step"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(pool), str(manifests), str(killed), str(marker), "5"],
                             cwd=root, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 540
        while not marker.exists():
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the training child never reached step 5"
            time.sleep(0.1)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(60)
    assert child.returncode == -signal.SIGKILL
    stage = killed / "router_pretrain"
    assert not (stage / "final").exists() and (stage / "checkpoint-4" / "trainer_state.json").is_file()

    def cfg(out):
        return tiny_config(out, pool, manifests, steps=6, only=("router_pretrain",))

    summary = run_training(cfg(killed), progress=False)["stages"]["router_pretrain"]
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-4") and finite(summary["last_loss"])
    run_training(cfg(whole), progress=False)

    losses = _router_pretrain_losses
    assert [s for s, _ in losses(killed)] == [1, 2, 3, 4, 5, 6]
    # the killed steps ran in another process (its own thread pool): equal to float rounding, not bit for bit
    assert [v for _, v in losses(killed)] == pytest.approx([v for _, v in losses(whole)], rel=1e-6)
    assert max_diff(load_weights(stage / "final"), load_weights(whole / "router_pretrain" / "final")) < 1e-6
