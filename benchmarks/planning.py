"""Does MoSE learn to plan? Trajectory decoders on the tiny MoSE and on a dense baseline of the same activated size,
over seeds, against constant velocity, PDM-Closed and the human driver, open and closed loop, on CPU. Prints JSON.

    python benchmarks/planning.py --pool DIR [--decoders head] [--models mose,dense] [--seeds 0,1,2] [--steps 300]
                                  [--eval-scenes 120] [--answer-scenes 8] [--closed-loop-episodes 2] [--markdown]

1. A ScenePool from `mose simulate` (generated into --work if --pool is not given), split by log into train and
   held-out scenes (benchmarks/router_pretrain.py's split: a log goes wholly to one side); --eval-scenes of the held-out
   scenes (a fixed, seeded subset) are scored.
2. The hierarchical (step-by-step) items of the train scenes, tokenised with a tokenizer trained on them and the tiny
   preset's processor.
3. Per decoder x model x seed, from that seed: the model trained from scratch (every parameter) for --steps AdamW
   steps on the same batches, loss = LM + routing losses (+ the planning head's loss for "head"). Models: "mose" (the
   tiny preset: 4 experts, top-2, every other layer) and "dense" (one expert of top_k x the FFN width in the same
   layers: the same activated parameters and FLOPs per token, no routing).
4. Open loop on the scored held-out scenes through eval/vlm_planner.py (the checkpoint's decoder; constrained
   decoding of the step-by-step answer): parse rate (complete 8-pose trajectories), ADE / FDE (m) against the
   scene's target trajectory (parsed answers only), the mean EPDMS (eval/navsim/scorer.py; an unparsed answer is an
   invalid row scoring 0). "head" plans come from the prompt's forward pass alone (`ModelPlanner(answer=False)`: the
   same poses as with the answer generated, see tests), after the head was refit full-batch on frozen features
   (--head-refit-steps, mose/plan_head_fit.py; the jointly trained head is scored too, as joint_open_loop); the full constrained answer is generated for the first
   --answer-scenes scenes to measure its well-formedness, tokens per plan and plans/s with answers. "text" needs the
   answer for every plan.
5. Closed loop (eval/closed_loop.py, highway-env, --closed-loop-episodes episodes of 15 s, the model replanning every
   0.5 s): route completion, crash rate and the episode EPDMS (a crash scores 0).
6. References on the same scenes / episodes: constant velocity, PDM-Closed, human (open loop; human has no closed loop).
The summary gives mean and standard deviation over seeds; --markdown also prints the README table on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCES = ("constant_velocity", "pdm_closed", "human")
CLOSED_LOOP_REFERENCES = ("constant_velocity", "pdm_closed")


def dense_overrides(tax, cfg) -> dict:
    """MoSEConfig overrides of the dense baseline: one expert, top-1, FFN width top_k x the experts' width, every
    skill on it (the same activated parameters per token as MoSE, nothing to route)."""
    return {"num_experts": 1, "top_k": 1, "expert_intermediate_size": cfg.num_experts_per_tok * cfg.expert_ffn_size,
            "skill_groups": {n: [0] for n in tax.names}, "skill_parents": {n: tax.root_of(n) for n in tax.names if tax.parent(n) is not None},
            "shared_expert": cfg.shared_expert}


def train(model, data, collate, *, steps: int, batch_size: int, lr: float, seed: int, plan: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    rows = []
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        out = model(**collate([data[i] for i in idx]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        rows.append((float(out.lm_loss.detach()), float(out.plan_loss.detach()) if plan else math.nan))
    model.eval()
    tenth = max(1, steps // 10)
    first, last = np.array(rows[:tenth]), np.array(rows[-tenth:])
    res = {"lm_loss_first_tenth": round(float(first[:, 0].mean()), 4), "lm_loss_last_tenth": round(float(last[:, 0].mean()), 4)}
    if plan:
        res |= {"plan_loss_first_tenth": round(float(first[:, 1].mean()), 4), "plan_loss_last_tenth": round(float(last[:, 1].mean()), 4)}
    return res


def open_loop(trajectories: dict, scenes, targets: dict, metric: str) -> dict:
    from eval.navsim.scorer import mean_score, score_scenes

    ade, fde = [], []
    for sid, poses in trajectories.items():
        if sid in targets:
            d = np.linalg.norm(np.asarray(poses)[:, :2] - targets[sid], axis=1)
            ade.append(float(d.mean()))
            fde.append(float(d[-1]))
    rows = score_scenes(scenes, trajectories, metric=metric, tracking=True, progress=False)
    return {"scenes": len(scenes), "parse_rate": round(len(trajectories) / max(len(scenes), 1), 4),
            "ade_m": round(float(np.mean(ade)), 3) if ade else None, "fde_m": round(float(np.mean(fde)), 3) if fde else None,
            metric: round(float(mean_score(rows)), 4)}


def plan_scenes(planner, scenes) -> tuple[dict, float]:
    """({scene id: poses} of the scenes the planner could plan, plans/s)."""
    out, t0 = {}, time.perf_counter()
    for s in scenes:
        try:
            out[s.id] = planner(s)
        except ValueError:  # an unreadable answer: an invalid row
            pass
    return out, len(scenes) / max(time.perf_counter() - t0, 1e-9)


def closed_loop(planner, episodes: int) -> dict:
    from eval.closed_loop import run_closed_loop

    m = run_closed_loop(planner, envs=["highway"], episodes=episodes, seed=500).means
    return {k: (round(float(m[k]), 4) if isinstance(m[k], float) else m[k])
            for k in ("episodes", "route_completion", "crash_rate", "crashes", "epdms", "planner_failures")}


def evaluate_model(ck: Path, decoder: str, args, tax, budget: int, scenes, targets: dict) -> dict:
    from eval.vlm_planner import ModelPlanner

    res = {}
    answered = ModelPlanner(ck, max_new_tokens=budget, taxonomy=tax).load()
    if decoder == "head":  # the poses from the prompt alone for every scene; answers for the first few
        fast = ModelPlanner(ck, max_new_tokens=budget, taxonomy=tax, answer=False).load()
        trajectories, res["plans_per_s_head_only"] = plan_scenes(fast, scenes)
        res["open_loop"] = open_loop(trajectories, scenes, targets, args.metric)
        _, res["plans_per_s_with_answer"] = plan_scenes(answered, scenes[:args.answer_scenes])
    else:
        trajectories, res["plans_per_s_with_answer"] = plan_scenes(answered, scenes)
        res["open_loop"] = open_loop(trajectories, scenes, targets, args.metric)
    asked = answered.decisions_
    res["answers"] = {"answers": len(asked), "format_ok": sum(bool(d["format_ok"]) for d in asked),
                      "trajectory_complete": sum(not d["reason"] for d in asked),
                      "tokens_per_plan": round(float(np.mean([d["new_tokens"] for d in asked])), 1) if asked else None}
    for k in ("plans_per_s_head_only", "plans_per_s_with_answer"):
        if k in res:
            res[k] = round(res[k], 3)
    answered.close()
    if args.closed_loop_episodes:
        planner = fast if decoder == "head" else ModelPlanner(ck, max_new_tokens=budget, taxonomy=tax)
        res["closed_loop"] = closed_loop(planner, args.closed_loop_episodes)
        planner.close()
    return res


def summarise(runs: list[dict], metric: str) -> dict:
    """Mean and standard deviation over seeds of every figure of a decoder x model."""
    fields = {"parse_rate": ("open_loop", "parse_rate"), "ade_m": ("open_loop", "ade_m"), "fde_m": ("open_loop", "fde_m"),
              metric: ("open_loop", metric), "closed_loop_route_completion": ("closed_loop", "route_completion"),
              "closed_loop_crash_rate": ("closed_loop", "crash_rate"), "closed_loop_epdms": ("closed_loop", "epdms"),
              "answers_format_ok": ("answers", "format_ok"), "answers_trajectory_complete": ("answers", "trajectory_complete"),
              "tokens_per_plan": ("answers", "tokens_per_plan"),
              "joint_ade_m": ("joint_open_loop", "ade_m"), f"joint_{metric}": ("joint_open_loop", metric)}
    out = {"seeds": len(runs)}
    for name, (a, b) in fields.items():
        vals = [r[a][b] for r in runs if a in r and r[a].get(b) is not None]
        if vals:
            out[name] = {"mean": round(float(np.mean(vals)), 4), "std": round(float(np.std(vals)), 4), "values": vals}
    for k in ("plans_per_s_head_only", "plans_per_s_with_answer"):
        vals = [r[k] for r in runs if k in r]
        if vals:
            out[k] = round(float(np.mean(vals)), 3)
    return out


def markdown(result: dict, metric: str) -> str:
    def ms(d, key, digits=3):
        v = d.get(key)
        if v is None:
            return "–"
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}" if len(v["values"]) > 1 else f"{v['mean']:.{digits}f}"

    lines = [f"| planner | seeds | parsed | ADE (m) | FDE (m) | {metric.upper()} | closed loop: route completion | crash rate | episode {metric.upper()} "
             f"| before the head refit: ADE (m) / {metric.upper()} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, s in result["summary"].items():
        lines.append(f"| {key} | {s['seeds']} | {ms(s, 'parse_rate', 2)} | {ms(s, 'ade_m', 2)} | {ms(s, 'fde_m', 2)} | {ms(s, metric, 4)} | "
                     f"{ms(s, 'closed_loop_route_completion', 3)} | {ms(s, 'closed_loop_crash_rate', 2)} | {ms(s, 'closed_loop_epdms', 4)} | "
                     f"{ms(s, 'joint_ade_m', 2)} / {ms(s, f'joint_{metric}', 4)} |")
    for name, r in result["references"].items():
        ol, cl = r["open_loop"], r.get("closed_loop", {})
        fmt = lambda v, d: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {name} (reference) | – | {fmt(ol['parse_rate'], 2)} | {fmt(ol['ade_m'], 2)} | {fmt(ol['fde_m'], 2)} | {fmt(ol[metric], 4)} | "
                     f"{fmt(cl.get('route_completion'), 3)} | {fmt(cl.get('crash_rate'), 2)} | {fmt(cl.get('epdms'), 4)} | – |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, help="an existing ScenePool (default: simulate one into --work)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_planning")
    ap.add_argument("--scenes", type=int, default=960, help="scenes to simulate when --pool is not given")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--held-out", type=float, default=0.3, help="share of logs held out")
    ap.add_argument("--eval-scenes", type=int, default=120, help="held-out scenes scored (a fixed seeded subset; 0: all)")
    ap.add_argument("--answer-scenes", type=int, default=8, help="'head': scenes whose full answer is generated too")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--plan-weight", type=float, default=1.0, help="weight of the planning head's loss (head decoder)")
    ap.add_argument("--head-refit-steps", type=int, default=1000,
                    help="'head': full-batch refit steps of the head on frozen features after training (0: none)")
    ap.add_argument("--decoders", default="head")
    ap.add_argument("--models", default="mose,dense")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--closed-loop-episodes", type=int, default=2)
    ap.add_argument("--no-references", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation budget cap; default: the longest training target + its margin (mose/answer_grammar.py answer_budget)")
    ap.add_argument("--metric", default="epdms")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="also print the README table on stderr")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, sys.stdout = sys.stdout, sys.stderr  # libraries' log lines (e.g. DeepSpeed's accelerator notice) stay off the JSON
    try:
        return _run(args, out)
    finally:
        sys.stdout = out


def _run(args, out) -> int:

    from benchmarks.router_pretrain import load_or_simulate, split_by_log
    from datasets_cfg.skill_items import pool_items
    from eval.closed_loop import constant_velocity_planner, pdm_closed_planner
    from eval.navsim.agents import run_agent
    from eval.vlm_planner import ModelPlanner
    from mose.plan_head_fit import fit_plan_head, plan_inputs
    from mose.answer_grammar import answer_budget, longest_target_tokens
    from mose.presets import build_preset, count_parameters, preset_config
    from mose.skill_data import SkillCollator, build_skill_dataset
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer
    from mose.skills import Taxonomy
    from mose.trajectory_decoders import trajectory_target

    t0 = time.perf_counter()
    tax = Taxonomy.load()
    pool = load_or_simulate(args.pool, args.work, args.scenes, 0, args.image_size)
    train_ids, test_ids = split_by_log(pool, args.held_out)
    if not train_ids or not test_ids:
        raise SystemExit(f"--held-out {args.held_out}: {len(train_ids)} train and {len(test_ids)} held-out scenes; both sides need scenes")
    if 0 < args.eval_scenes < len(test_ids):
        test_ids = sorted(np.random.default_rng(0).choice(sorted(test_ids), args.eval_scenes, replace=False).tolist())
    items, _ = pool_items(pool.select_ids(train_ids), tax, kinds=("hierarchical",))
    held_items, _ = pool_items(pool.select_ids(test_ids), tax, kinds=("hierarchical",))
    targets = {sid: xy for sid, t in zip(held_items["scene_id"], held_items["target"]) if (xy := trajectory_target(t)) is not None}
    moe = tax.config_kwargs(4)
    cfg = preset_config("tiny", **moe)
    text = cfg.get_text_config(decoder=True)
    tok = train_chat_tokenizer((p + "\n" + t for p, t in zip(items["prompt"], items["target"])), text.vocab_size,
                               image_token_id=cfg.base_config.image_token_id)
    processor = llava_processor_for(cfg, tok)
    data, _ = build_skill_dataset(items, processor, tax, max_length=text.max_position_embeddings)
    scenes = list(pool.select_ids(test_ids))
    budget = answer_budget(longest_target_tokens(items["target"], tok), args.max_new_tokens, where="--max-new-tokens")
    models = {"mose": moe, "dense": dense_overrides(tax, cfg)}
    result = {"pool": str(args.pool or args.work), "train_scenes": len(train_ids), "eval_scenes": len(scenes), "train_items": len(data),
              "max_new_tokens": budget, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "plan_weight": args.plan_weight,
              "head_refit_steps": args.head_refit_steps,
              "closed_loop_episodes": args.closed_loop_episodes, "runs": [], "summary": {}, "references": {}}
    if not args.no_references:
        cl_refs = {"constant_velocity": constant_velocity_planner, "pdm_closed": pdm_closed_planner}
        for name in REFERENCES:
            result["references"][name] = {"open_loop": open_loop(run_agent(name, scenes), scenes, targets, args.metric)}
            if args.closed_loop_episodes and name in cl_refs:
                result["references"][name]["closed_loop"] = closed_loop(cl_refs[name](), args.closed_loop_episodes)
            print(f"[planning] reference {name}: {result['references'][name]}", file=sys.stderr, flush=True)
    for decoder in args.decoders.split(","):
        for model_name in args.models.split(","):
            runs = []
            for seed in [int(s) for s in args.seeds.split(",")]:
                torch.manual_seed(seed)
                model = build_preset("tiny", seed=seed, trajectory_decoder=decoder, plan_loss_coef=args.plan_weight, **models[model_name])
                t1 = time.perf_counter()
                hist = train(model, data, SkillCollator(processor, plan=decoder == "head"), steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, seed=seed, plan=decoder == "head")
                ck = args.work / f"ckpt-{decoder}-{model_name}-s{seed}"
                run = {"decoder": decoder, "model": model_name, "seed": seed, "parameters": count_parameters(model.config), **hist}
                if decoder == "head" and args.head_refit_steps:
                    joint = args.work / f"ckpt-{decoder}-{model_name}-s{seed}-joint"
                    model.save_pretrained(joint)
                    processor.save_pretrained(joint)
                    fast = ModelPlanner(joint, max_new_tokens=budget, taxonomy=tax, answer=False).load()
                    run["joint_open_loop"] = open_loop(plan_scenes(fast, scenes)[0], scenes, targets, args.metric)
                    fast.close()
                    t_refit = time.perf_counter()
                    feats, prior, tgt = plan_inputs(model, data, SkillCollator(processor, plan=True))
                    run["head_refit"] = fit_plan_head(model.plan_head, feats, prior, tgt, steps=args.head_refit_steps)
                    run["head_refit"]["seconds"] = round(time.perf_counter() - t_refit, 1)
                model.save_pretrained(ck)
                processor.save_pretrained(ck)
                t2 = time.perf_counter()
                run |= evaluate_model(ck, decoder, args, tax, budget, scenes, targets)
                run |= {"train_seconds": round(t2 - t1, 1), "eval_seconds": round(time.perf_counter() - t2, 1)}
                runs.append(run)
                result["runs"].append(run)
                print(f"[planning] {json.dumps(run)}", file=sys.stderr, flush=True)
            result["summary"][f"{model_name} / {decoder}"] = summarise(runs, args.metric)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1), file=out, flush=True)
    if args.markdown:
        print(markdown(result, args.metric), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
