"""Multi-process training through the launchers the README documents (accelerate, torchrun), 2 CPU processes.

On a CPU machine `accelerate launch --multi_gpu` and `torchrun` start the same torch.distributed world that they
start on GPUs (gloo instead of NCCL); the training code path is the one a GPU run takes."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.training_helpers import TINY, ZERO2, finite, session_pool

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(path: Path, out: Path, pool: Path, manifests: Path) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["run"].update(output_dir=str(out), deepspeed=str(ZERO2), save_steps=2, progress=False)
    raw["data"].update(pool=str(pool), manifests=str(manifests), max_length=768)
    for stage in raw["stages"].values():
        stage.update(max_steps=3, batch_size=2, warmup_ratio=0.0)
    path.write_text(yaml.safe_dump(raw))
    return path


LAUNCHERS = {
    "accelerate": lambda port: [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(port), "-m", "pipelines.cli"],
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                              "-m", "pipelines.cli"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_launch_trains_a_stage_with_deepspeed(launcher, tmp_path_factory, tmp_path):
    """`<launcher> ... pipelines.cli train --config C.yaml --stages align`: a 2-process world (ZeRO-2), 3 steps, finite
    losses, one log row per step with both ranks' data, a final checkpoint that loads with plain transformers."""
    import torch

    from tests.training_helpers import load_weights

    pool, manifests = session_pool(tmp_path_factory)
    out = tmp_path / "out"
    cfg = _config(tmp_path / "c.yaml", out, pool, manifests)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = LAUNCHERS[launcher](_free_port()) + ["train", "--config", str(cfg), "--stages", "align"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((out / "align" / "final" / "stage_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and finite(summary["last_loss"])
    rows = [json.loads(line) for line in (out / "align" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # one row per step (rank 0 writes), not one per process
    # both ranks consumed data: 2 processes x batch 2 = all 4 align items per step, so every step is one epoch and
    # the logged (all-reduced) token count is the same whole-dataset count each step
    assert summary["items"] == 4 and [r["epoch"] for r in steps] == [1.0, 2.0, 3.0]
    assert len({r["tokens"] for r in steps}) == 1 and steps[0]["tokens"] > 0
    final = load_weights(out / "align" / "final")
    assert any("projector" in k for k in final) and all(torch.isfinite(v).all() for v in final.values())
