"""`mose train` configs and bad input: every mistake is a clear error naming the config file and the key, raised
before any stage trains; and the command end to end through `pipelines.cli.main`."""
from __future__ import annotations

import json

import pytest
import yaml

from pipelines.cli import main
from tests.training_helpers import TINY, session_pool, write_manifests


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return session_pool(tmp_path_factory)


def write_yaml(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_raw(tmp_path, pool, manifests) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw["run"].update(output_dir=str(tmp_path / "out"), deepspeed=None, progress=False)
    raw["data"].update(pool=str(pool), manifests=str(manifests))
    for st in raw["stages"].values():
        st["max_steps"] = 1
    return raw


def test_shipped_tiny_config_and_stage_defaults():
    from training.config import load_config

    cfg = load_config(TINY)
    assert cfg.stage_names() == ["align", "router_pretrain", "skill_tune"]
    assert cfg.run.deepspeed.endswith("training/deepspeed/zero2.json") and cfg.run.precision == "auto"
    al, rp, sk = (cfg.stages[s] for s in cfg.stage_names())
    assert al.trainable == ["projector"] and al.items.kinds == ["single"] and al.items.roots == ["perception"]
    assert (al.losses.balance, al.losses.z, al.losses.skill) == (0.0, 0.0, 0.0) and al.lr == 1e-3
    assert rp.trainable == ["router"] and rp.sampler == "skill_balanced" and rp.losses.skill == 1.0
    assert sk.trainable == ["router", "experts", "shared_expert"] and sk.lora.r == 4 and sk.lora.alpha == 8.0
    assert sk.items.kinds == ["hierarchical", "single"] and sk.lr == 5e-4


@pytest.mark.parametrize("edit, key, words", [
    (lambda r: r.update(optimiser={}), "optimiser", "unknown key"),
    (lambda r: r["stages"]["align"].update(lrr=0.1), "stages.align.lrr", "unknown key"),
    (lambda r: r["stages"].update(pretrain={}), "stages.pretrain", "unknown stage"),
    (lambda r: r["stages"]["align"].update(losses={"entropy": 1.0}), "stages.align.losses.entropy", "unknown key"),
    (lambda r: r["stages"]["align"].update(lr="fast"), "stages.align.lr", "expected a number"),
    (lambda r: r["run"].update(seed=1.5), "run.seed", "expected an integer"),
    (lambda r: r["stages"]["align"].update(trainable=["projector", "everything"]), "stages.align.trainable", "module groups"),
    (lambda r: r["stages"]["align"].update(trainable="projector"), "stages.align.trainable", "expected a list"),
    (lambda r: r["stages"]["skill_tune"]["lora"].update(r=0), "stages.skill_tune.lora", "r >= 1"),
    (lambda r: r["run"].update(deepspeed="nowhere/zero9.json"), "run.deepspeed", "file not found"),
    (lambda r: r["model"].update(path="some/ckpt"), "model", "exactly one of"),
    (lambda r: r["model"].update(recipe="everything"), "model.recipe", "one of auto, pretrained, from_scratch"),
    (lambda r: r.update(stages={}), "stages", "at least one"),
])
def test_bad_config_names_file_and_key(tmp_path, data, edit, key, words):
    from training.config import ConfigError, load_config

    raw = tiny_raw(tmp_path, *data)
    edit(raw)
    path = write_yaml(tmp_path / "bad.yaml", raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}") and words in msg, msg


def _manifests(tmp_path, pool, per_stage):
    return write_manifests(pool, tmp_path / "m", per_stage)


@pytest.mark.parametrize("case", ["missing", "foreign_ids", "empty_manifest", "no_items", "edited", "lora_targets", "bad_group"])
def test_bad_data_fails_before_any_training(case, tmp_path, data, capsys):
    from datasets_cfg.schema import ScenePool

    pool, manifests = data
    ids = ScenePool.load(pool).ids
    raw = tiny_raw(tmp_path, pool, manifests)
    key, words = "data.manifests", ""
    if case == "missing":
        m = _manifests(tmp_path, pool, {"align": ids[:2], "skill_tune": ids[:2]})
        raw["data"]["manifests"] = str(m)
        words = "router_pretrain"
    elif case == "foreign_ids":
        m = _manifests(tmp_path, pool, {"align": ids[:2], "router_pretrain": ids[:1] + ["navsim-0042", "navsim-0043"], "skill_tune": ids[:2]})
        raw["data"]["manifests"] = str(m)
        words = "2 scene id(s) not in the pool"
    elif case == "empty_manifest":
        m = _manifests(tmp_path, pool, {"align": ids[:2], "router_pretrain": ids[:2], "skill_tune": []})
        raw["data"]["manifests"] = str(m)
        words = "selects no scene"
    elif case == "no_items":  # region QA of a planning-only stage: no item can qualify
        raw["stages"]["skill_tune"]["items"] = {"kinds": ["single"], "roots": ["planning"], "tasks": ["region"]}
        key, words = "stages.skill_tune", "empty stage"
    elif case == "edited":
        m = _manifests(tmp_path, pool, {"align": ids[:2], "router_pretrain": ids[:2], "skill_tune": ids[:2]})
        rows = (m / "align.jsonl").read_text().replace(ids[0], ids[5])
        (m / "align.jsonl").write_text(rows)
        raw["data"]["manifests"] = str(m)
        words = "checksum"
    elif case == "lora_targets":
        raw["stages"]["skill_tune"]["lora"]["targets"] = ["qkv_proj"]
        key, words = "stages.skill_tune.lora.targets", "match no attention projection"
    elif case == "bad_group":  # a real group the tiny preset does not have
        raw["stages"]["router_pretrain"]["trainable"] = ["shared_expert"]
        key, words = "stages.router_pretrain.trainable", "no module group this model has"
    path = write_yaml(tmp_path / "c.yaml", raw)
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"mose train: error: {path}: {key}" in err and words in err, err
    out = tmp_path / "out"
    assert not any((out / s).exists() for s in ("align", "router_pretrain", "skill_tune"))  # nothing trained


def test_cli_trains_resumes_and_reruns_one_stage(tmp_path, data, capsys):
    pool, manifests = data
    args = ["train", "--config", str(TINY), "--pool", str(pool), "--manifests", str(manifests), "--output-dir", str(tmp_path),
            "--deepspeed", "none", "--max-steps", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "mose train: skill_tune: 1 steps" in printed.out
    for stage, group in (("align", "projector"), ("router_pretrain", "router"), ("skill_tune", "experts")):
        assert f"[{stage}] parameters" in printed.err
    assert "lora" in printed.err and "% trainable" in printed.err
    assert json.loads((tmp_path / "train_config.json").read_text())["run"]["deepspeed"] is None
    # the same command again: every stage is done, nothing retrains
    assert main(args) == 0
    assert printed.err.count("already done") == 0 and capsys.readouterr().err.count("already done") == 3
    # one stage again from scratch, two steps, from router_pretrain's final model
    assert main(args[:-3] + ["--max-steps", "2", "--stages", "skill_tune", "--fresh", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "skill_tune" / "final" / "stage_summary.json").read_text())
    assert summary["steps"] == 2 and summary["resumed_from"] is None
    assert main(["train", "--config", str(TINY), "--max-steps", "0"]) == 2
    assert "--max-steps" in capsys.readouterr().err


def test_stage_subset_needs_earlier_stages_done(tmp_path, data, capsys):
    pool, manifests = data
    assert main(["train", "--config", str(TINY), "--pool", str(pool), "--manifests", str(manifests), "--output-dir", str(tmp_path),
                 "--deepspeed", "none", "--stages", "skill_tune", "--no-progress"]) == 2
    assert "comes before 'skill_tune'" in capsys.readouterr().err


def test_partial_single_process_environment_is_completed(monkeypatch):
    import os

    from training.runner import ensure_distributed_env

    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # left behind without RANK: must still give a one-process world
    ensure_distributed_env()
    assert os.environ["RANK"] == "0" and os.environ["LOCAL_RANK"] == "0" and os.environ["MASTER_ADDR"] == "127.0.0.1"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK")
    with __import__("pytest").raises(RuntimeError, match="launcher"):
        ensure_distributed_env()
