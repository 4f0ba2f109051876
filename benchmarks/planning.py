"""Trajectory decoders on the tiny MoSE, on CPU: "text" (decimals in the answer) vs "head" (planning head on a
constant-velocity prior, mose/trajectory_decoders.py), against constant velocity itself. Prints JSON.

    python benchmarks/planning.py [--pool DIR] [--scenes 48] [--steps 120] [--decoders text,head]

1. A ScenePool from `mose simulate` (generated into --work if --pool is not given), split by log into train and
   held-out scenes (benchmarks/router_pretrain.py's split: a log goes wholly to one side).
2. The hierarchical (step-by-step) items of the train scenes, tokenised with a tokenizer trained on them and the tiny
   preset's processor.
3. Per decoder, from the same seed: the tiny MoSE trained from scratch (every parameter) for --steps AdamW steps on
   the same batches, loss = LM + routing losses (+ the planning head's loss for "head"); saved with its processor.
4. Held-out scenes through eval/vlm_planner.py (the hierarchical prompt, greedy generation, the checkpoint's decoder):
   parse rate (complete 8-pose trajectories), ADE / FDE (m) against the target trajectory of the scene's hierarchical
   item (valid answers only), and the mean EPDMS over all held-out scenes (eval/navsim/scorer.py; an unreadable answer
   scores 0 as an invalid row). The baseline, "constant_velocity", plans x_k = v t_k, y_k = 0 from the prompt's speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train(model, data, collate, *, steps: int, batch_size: int, lr: float, seed: int, plan: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    first = last = None
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        batch = collate([data[i] for i in idx])
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        rec = {"lm_loss": round(float(out.lm_loss.detach()), 4)}
        if plan:
            rec["plan_loss"] = round(float(out.plan_loss.detach()), 4)
        first = first or rec
        last = rec
    model.eval()
    return {"first_step": first, "last_step": last}


def evaluate(planner_fn, scenes, targets: dict, metric: str) -> dict:
    from eval.navsim.scorer import mean_score, score_scenes

    trajectories, ade, fde, reasons = {}, [], [], {}
    for s in scenes:
        try:
            poses = planner_fn(s)
        except ValueError as exc:  # unreadable answer: an invalid row
            reasons[s.id] = str(exc)
            continue
        trajectories[s.id] = poses
        if s.id in targets:
            d = np.linalg.norm(poses[:, :2] - targets[s.id], axis=1)
            ade.append(float(d.mean()))
            fde.append(float(d[-1]))
    rows = score_scenes(scenes, trajectories, metric=metric, tracking=True, progress=False)
    return {"scenes": len(scenes), "parse_rate": round(len(trajectories) / max(len(scenes), 1), 4),
            "ade_m": round(float(np.mean(ade)), 3) if ade else None, "fde_m": round(float(np.mean(fde)), 3) if fde else None,
            metric: round(float(mean_score(rows)), 4), "invalid_reasons": sorted({r.split(":")[0] for r in reasons.values()})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, help="an existing ScenePool (default: simulate one into --work)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_planning")
    ap.add_argument("--scenes", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--held-out", type=float, default=0.3, help="share of logs held out")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--plan-weight", type=float, default=1.0, help="weight of the planning head's loss (head decoder)")
    ap.add_argument("--decoders", default="text,head")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation budget cap; default: the longest training target + its margin (mose/answer_grammar.py answer_budget)")
    ap.add_argument("--metric", default="epdms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from benchmarks.router_pretrain import load_or_simulate, split_by_log
    from datasets_cfg.skill_items import hierarchical_prompt, pool_items
    from eval.vlm_planner import ModelPlanner
    from mose.presets import build_preset, preset_config
    from mose.skill_data import SkillCollator, build_skill_dataset
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer
    from mose.skills import Taxonomy
    from mose.trajectory_decoders import constant_velocity_prior, headings_from_xy, prompt_ego_speed, trajectory_target

    t0 = time.perf_counter()
    tax = Taxonomy.load()
    pool = load_or_simulate(args.pool, args.work, args.scenes, 0, args.image_size)
    train_ids, test_ids = split_by_log(pool, args.held_out)
    if not train_ids or not test_ids:
        raise SystemExit(f"--scenes {args.scenes} / --held-out {args.held_out}: {len(train_ids)} train and {len(test_ids)} "
                         "held-out scenes; both sides need scenes (more scenes, or another --held-out)")
    items, _ = pool_items(pool.select_ids(train_ids), tax, kinds=("hierarchical",))
    held_items, _ = pool_items(pool.select_ids(test_ids), tax, kinds=("hierarchical",))
    targets = {sid: xy for sid, t in zip(held_items["scene_id"], held_items["target"]) if (xy := trajectory_target(t)) is not None}
    moe = tax.config_kwargs(4)
    cfg = preset_config("tiny", **moe)
    text = cfg.get_text_config(decoder=True)
    tok = train_chat_tokenizer((p + "\n" + t for p, t in zip(items["prompt"], items["target"])), text.vocab_size,
                               image_token_id=cfg.base_config.image_token_id)
    processor = llava_processor_for(cfg, tok)
    data, rep = build_skill_dataset(items, processor, tax, max_length=text.max_position_embeddings)
    scenes = list(pool.select_ids(test_ids))
    from mose.answer_grammar import answer_budget, longest_target_tokens

    budget = answer_budget(longest_target_tokens(items["target"], tok), args.max_new_tokens, where="--max-new-tokens")
    result = {"max_new_tokens": budget, "train_scenes": len(train_ids), "held_out_scenes": len(scenes), "train_items": len(data), "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "decoders": {}}

    def constant_velocity(scene):
        v = prompt_ego_speed(hierarchical_prompt(scene.row, tax))
        xy = constant_velocity_prior([v if np.isfinite(v) else 0.0])[0].numpy().astype(float)
        return np.column_stack([xy, headings_from_xy(xy)])

    result["constant_velocity"] = evaluate(constant_velocity, scenes, targets, args.metric)
    for name in args.decoders.split(","):
        torch.manual_seed(args.seed)
        model = build_preset("tiny", seed=args.seed, trajectory_decoder=name, plan_loss_coef=args.plan_weight, **moe)
        t1 = time.perf_counter()
        hist = train(model, data, SkillCollator(processor, plan=name == "head"), steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed, plan=name == "head")
        ck = args.work / f"ckpt-{name}"
        model.save_pretrained(ck)
        processor.save_pretrained(ck)
        t2 = time.perf_counter()
        planner = ModelPlanner(ck, max_new_tokens=budget, taxonomy=tax).load()
        res = evaluate(planner, scenes, targets, args.metric)
        planner.close()
        res.update(hist, train_seconds=round(t2 - t1, 1), eval_seconds=round(time.perf_counter() - t2, 1))
        result["decoders"][name] = res
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
