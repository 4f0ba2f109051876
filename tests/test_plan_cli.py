"""`mose plan` (eval/plan_cli.py): a checkpoint plans a pool's scenes into a NAVSIM predictions file."""
import json

import numpy as np
import pytest

from datasets_cfg.schema import ScenePool
from eval.navsim.predictions import read_predictions
from pipelines.cli import main
from tests.skill_fixtures import driving_row, write_image


def _checkpoints(tmp_path):
    from mose.presets import build_preset, preset_config
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer

    cfg = preset_config("tiny", trajectory_decoder="head")
    tok = train_chat_tokenizer(["<planning>\n[trajectory] [(1.00, 0.00)]\n</planning>"] * 4, cfg.get_text_config(decoder=True).vocab_size,
                               image_token_id=cfg.base_config.image_token_id)
    out = {}
    for name, decoder in (("head", "head"), ("text", "text")):
        ck = tmp_path / name
        build_preset("tiny", trajectory_decoder=decoder).save_pretrained(ck)  # untrained: the head's residual is 0
        llava_processor_for(cfg, tok).save_pretrained(ck)
        out[name] = ck
    return out


@pytest.mark.usefixtures("one_thread")
def test_an_untrained_head_plans_the_constant_velocity_prior_into_a_predictions_file(tmp_path, capsys):
    """driving_row's ego drives 8.0 m/s: the prior (mose/trajectory_decoders.py) is x_k = 8.0 * 0.5 k, y_k = 0."""
    rows = [driving_row(f"s{i}", image=write_image(tmp_path / f"s{i}.png", seed=i)) for i in range(2)]
    ScenePool.from_rows(rows).save(tmp_path / "pool")
    cks = _checkpoints(tmp_path)
    out = tmp_path / "pred.json"
    assert main(["plan", "--model", str(cks["head"]), "--pool", str(tmp_path / "pool"), "--out", str(out), "--no-progress"]) == 0
    assert "2 of 2 scenes planned" in capsys.readouterr().out
    plans, interval = read_predictions(out)
    assert sorted(plans) == ["s0", "s1"] and interval == 0.5
    for poses in plans.values():
        np.testing.assert_allclose(poses[:, 0], 4.0 * np.arange(1, 9), atol=1e-5)
        np.testing.assert_allclose(poses[:, 1:], 0.0, atol=1e-6)
    assert json.loads(out.read_text())["format"] == "navsim-trajectories"
    # a text checkpoint has to answer: without a budget it is refused with the reason
    assert main(["plan", "--model", str(cks["text"]), "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "t.json")]) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert main(["plan", "--model", str(cks["head"]), "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "t.txt")]) == 2
    assert ".json or .csv" in capsys.readouterr().err
