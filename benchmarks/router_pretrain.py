"""Router pretraining on the simulator corpus with the tiny preset, on CPU. Prints JSON.

    python benchmarks/router_pretrain.py [--pool DIR] [--scenes 120] [--steps 150] [--seeds 0]

1. A ScenePool from `mose simulate` (generated into --work if --pool is not given), split by log into train and
   held-out scenes (scenes of one episode never straddle the split).
2. Items (datasets_cfg/skill_items.py: the step-by-step target per scene + the single-skill QA items), tokenised
   with the preset's processor (mose/skill_data.py).
3. From one initialisation per seed, two runs over the same batches, steps and seed: with the skill loss and
   without it (LM + balance + z-loss only). Everything trains ("all"): attention has to carry each step's
   context to its tokens for a router to see it.
4. Held-out routing accuracy (top-1 expert in the coarse / fine skill's group), balance and LM loss before and
   after; wall time of each run. Figures are medians over seeds; the per-seed values are printed too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_or_simulate(pool_dir: Path | None, work: Path, scenes: int, seed: int, image_size: int):
    from datasets_cfg.schema import ScenePool

    if pool_dir is None:
        pool_dir = work / f"sim-{scenes}-s{seed}-{image_size}px"
        if not (pool_dir / "pool.json").exists():
            import contextlib

            from pipelines.cli import main

            with contextlib.redirect_stdout(sys.stderr):  # keep stdout for this benchmark's JSON
                rc = main(["simulate", "--out", str(pool_dir), "--scenes", str(scenes), "--seed", str(seed), "--image-size",
                           str(image_size), "--scenes-per-episode", "6", "--stride", "2", "--no-progress"])
            if rc != 0:
                raise SystemExit(f"mose simulate failed with exit code {rc}")
    return ScenePool.load(pool_dir)


def split_by_log(pool, held_out: float):
    """Scene ids of train / held-out: a log goes wholly to one side (by a hash of its name)."""
    train, test = [], []
    for sid, meta in zip(pool.ids, pool.column("meta")):
        log = json.loads(meta).get("log_name", sid)
        (test if zlib.crc32(log.encode()) % 1000 < held_out * 1000 else train).append(sid)
    return train, test


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, help="an existing ScenePool (default: simulate one into --work)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_router_pretrain")
    ap.add_argument("--scenes", type=int, default=120)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--held-out", type=float, default=0.25, help="share of logs held out")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--skill-loss-coef", type=float, default=1.0)
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; figures are medians over them")
    ap.add_argument("--sampler", choices=("shuffle", "balanced"), default="shuffle",
                    help="balanced: SkillBalancedSampler, uniform over the fine skills present (token shares)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for a tiny model on a shared CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from benchmarks.router_pretrain_loop import pretrain_router
    from datasets_cfg.skill_items import pool_items
    from mose.presets import build_preset, preset_config
    from mose.routing_eval import evaluate_routing, usage_heatmap
    from mose.skill_data import SkillCollator, build_skill_dataset
    from mose.skill_sampler import SkillBalancedSampler
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer
    from mose.skills import Taxonomy

    t_start = time.perf_counter()
    tax = Taxonomy.load()
    pool = load_or_simulate(args.pool, args.work, args.scenes, 0, args.image_size)
    train_ids, test_ids = split_by_log(pool, args.held_out)
    seeds = [int(s) for s in args.seeds.split(",")]
    items, item_reports = {}, {}
    for name, ids in (("train", train_ids), ("held_out", test_ids)):
        items[name], rep = pool_items(pool.select_ids(ids), tax)
        item_reports[name] = rep.as_dict()
    cfg = preset_config("tiny", **moe_options(tax, args))
    text = cfg.get_text_config(decoder=True)
    tokenizer = train_chat_tokenizer((p + "\n" + t for p, t in zip(items["train"]["prompt"], items["train"]["target"])),
                                     text.vocab_size, image_token_id=cfg.base_config.image_token_id)
    processor = llava_processor_for(cfg, tokenizer)
    collate = SkillCollator(processor)
    data, reports = {}, {}
    for name in items:
        data[name], rep = build_skill_dataset(items[name], processor, tax, max_length=min(args.max_length, text.max_position_embeddings))
        reports[name] = {"scenes": len(train_ids if name == "train" else test_ids), "items": item_reports[name], "tokens": rep.as_dict()}
    t_data = time.perf_counter() - t_start

    runs = []
    for seed in seeds:
        model = build_preset("tiny", seed=seed, **moe_options(tax, args))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        before = evaluate_routing(model, data["held_out"], collate, tax)
        res = {"seed": seed, "before": before.as_dict()}
        for label, skill_loss in (("skill_loss", True), ("no_skill_loss", False)):
            model.load_state_dict(state)
            t0 = time.perf_counter()
            sampler = None
            if args.sampler == "balanced":
                sampler = SkillBalancedSampler(data["train"], tax, level="fine", random_state=seed)
                res["sampler_expected_fine_share"] = {k: round(v, 4) for k, v in sampler.expected_.items()}
            hist = pretrain_router(model, data["train"], collate, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                   trainable="all", skill_loss=skill_loss, skill_loss_coef=args.skill_loss_coef, sampler=sampler,
                                   random_state=seed, log_every=max(1, args.steps // 10), progress=False)
            wall = time.perf_counter() - t0
            after = evaluate_routing(model, data["held_out"], collate, tax)
            res[label] = {"after": after.as_dict(), "train_seconds": round(wall, 2), "last_log": hist[-1]}
            if skill_loss and seed == seeds[0]:
                described = describe_model(model)
                args.work.mkdir(parents=True, exist_ok=True)
                res[label]["heatmap"] = str(usage_heatmap(after, tax, model.config.skill_groups, args.work / "usage_after.png"))
                usage_heatmap(before, tax, model.config.skill_groups, args.work / "usage_before.png")
        runs.append(res)

    med = lambda f: round(statistics.median(f(r) for r in runs), 4)  # noqa: E731
    summary = {
        "coarse_accuracy_before": med(lambda r: r["before"]["coarse_accuracy"]),
        "coarse_accuracy_after": med(lambda r: r["skill_loss"]["after"]["coarse_accuracy"]),
        "coarse_accuracy_after_without_skill_loss": med(lambda r: r["no_skill_loss"]["after"]["coarse_accuracy"]),
        "fine_accuracy_before": med(lambda r: r["before"]["fine_accuracy"]),
        "fine_accuracy_after": med(lambda r: r["skill_loss"]["after"]["fine_accuracy"]),
        "fine_accuracy_after_without_skill_loss": med(lambda r: r["no_skill_loss"]["after"]["fine_accuracy"]),
        "chance_coarse": chance_coarse(tax, cfg, reports["held_out"]["tokens"]["tokens_per_skill"]),
        "held_out_lm_loss_with_skill_loss": med(lambda r: r["skill_loss"]["after"]["lm_loss"]),
        "held_out_lm_loss_without_skill_loss": med(lambda r: r["no_skill_loss"]["after"]["lm_loss"]),
        "lm_loss_ratio_with_over_without": med(lambda r: r["skill_loss"]["after"]["lm_loss"] / r["no_skill_loss"]["after"]["lm_loss"]),
        "held_out_lm_loss_before": med(lambda r: r["before"]["lm_loss"]),
        "balance_after": med(lambda r: r["skill_loss"]["after"]["balance"]),
        "balance_after_without_skill_loss": med(lambda r: r["no_skill_loss"]["after"]["balance"]),
        "train_seconds_with_skill_loss": med(lambda r: r["skill_loss"]["train_seconds"]),
        "train_seconds_without_skill_loss": med(lambda r: r["no_skill_loss"]["train_seconds"]),
        "data_seconds": round(t_data, 2),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    summary["time_ratio_with_over_without"] = round(summary["train_seconds_with_skill_loss"] / summary["train_seconds_without_skill_loss"], 3)
    print(json.dumps({"summary": summary, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                      "model": described, "data": reports, "runs": runs}, indent=2))
    return 0


def moe_options(tax, args) -> dict:
    """The tiny preset's MoE options with the taxonomy's skill groups for --num-experts, and --top-k."""
    return {**tax.config_kwargs(args.num_experts), "top_k": args.top_k}


def chance_coarse(tax, cfg, tokens_per_skill: dict) -> float:
    """Coarse accuracy of a uniformly random top-1 router on these tokens: sum_r share_r * |group_r| / E."""
    total = sum(tokens_per_skill.values())
    by_root = {r: sum(v for n, v in tokens_per_skill.items() if tax.root_of(n) == r) for r in tax.roots}
    return round(sum(by_root[r] / total * len(cfg.skill_groups[r]) / cfg.num_experts for r in tax.roots), 4)


def describe_model(model) -> dict:
    cfg = model.config
    return {"num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "moe_layers": cfg.moe_layer_indices,
            "parameters": sum(p.numel() for p in model.parameters()), "skill_groups": cfg.skill_groups}


if __name__ == "__main__":
    sys.exit(main())
