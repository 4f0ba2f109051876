"""`mose train`: run the training stages of a config (align -> router_pretrain -> skill_tune).

    mose train --config training/configs/tiny.yaml [--stages align,skill_tune] [--output-dir DIR] [--pool DIR]
               [--manifests DIR] [--deepspeed FILE|none] [--max-steps N] [--fresh] [--no-progress]

Re-running the same command resumes: finished stages are skipped, an interrupted one continues from its last
checkpoint. Multi-GPU / multi-node: start the same command under a launcher (each process reads its rank from the
environment), e.g. `torchrun --nproc_per_node 8 -m pipelines.cli train --config C.yaml`,
`accelerate launch --multi_gpu --num_processes 8 -m pipelines.cli train --config C.yaml` or
`deepspeed --num_gpus 8 --no_local_rank --module pipelines.cli train --config C.yaml`.
"""
from __future__ import annotations

import argparse
import sys

from common.errors import MoseError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (training/configs/*.yaml)")
    parser.add_argument("--stages", help="comma-separated subset of the config's stages to run (earlier ones must be done)")
    parser.add_argument("--output-dir", help="override run.output_dir")
    parser.add_argument("--pool", help="override data.pool (ScenePool directory)")
    parser.add_argument("--manifests", help="override data.manifests (directory of <stage>.jsonl manifests)")
    parser.add_argument("--deepspeed", help="override run.deepspeed: a DeepSpeed JSON, or 'none' for plain PyTorch")
    parser.add_argument("--max-steps", type=int, help="override max_steps of every stage (smoke runs)")
    parser.add_argument("--fresh", action="store_true", help="delete the stages' previous outputs and checkpoints first")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def overrides_from_args(args) -> dict:
    out = {}
    if args.output_dir:
        out["run.output_dir"] = args.output_dir
    if args.pool:
        out["data.pool"] = args.pool
    if args.manifests:
        out["data.manifests"] = args.manifests
    if args.deepspeed:
        out["run.deepspeed"] = None if args.deepspeed.lower() == "none" else args.deepspeed
    if args.no_progress:
        out["run.progress"] = False
    return out


def run(args) -> int:
    from training.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides_from_args(args))
        if args.max_steps is not None:
            if args.max_steps < 1:
                raise ConfigError(f"--max-steps: expected an integer >= 1, got {args.max_steps}")
            for st in cfg.stages.values():
                st.max_steps = args.max_steps
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        from training.runner import run_training

        result = run_training(cfg, stages=stages, fresh=args.fresh, progress=not args.no_progress)
    except (MoseError, FileNotFoundError) as exc:  # FileNotFoundError: e.g. a checkpoint to resume from
        print(f"mose train: error: {exc}", file=sys.stderr)
        return 2
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        for name, s in result["stages"].items():
            print(f"mose train: {name}: {s['steps']} steps, last loss {s['last_loss']}")
        print(f"mose train: final model -> {result['final']}")
    return 0


__all__ = ["add_arguments", "run"]
