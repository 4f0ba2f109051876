"""The steps of `mose demo` (pipelines/demo.py runs them, reuses finished ones and writes the markers).

Each function takes a `StepContext` (its folder `ctx.dir`, the run folder, the demo config), calls the package's
own APIs, writes its outputs into `ctx.dir` and returns a JSON-able summary (written as `summary.json`). Paths kept in
summaries are relative to the run folder, so a run folder can be moved and still be reused. The skill taxonomy is
`ctx.taxonomy` (loaded once by the demo). The skills step writes the training pool's hierarchical skill dataset as
`skills/items.jsonl` + `skills/items.header.json` (the format of datasets_cfg/skill_dataset.py, the one training keeps
per stage in `train/skill_items/<stage>.jsonl`).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

from common.atomic import write_json, write_jsonl

MODELS = ("mose", "dense")  # evaluated models: step folder of each
MODEL_STEP = {"mose": "train", "dense": "train_dense"}
from common.constants import STAGE_ORDER as STAGES


def _rel(ctx, path) -> str:
    return os.path.relpath(Path(path).resolve(), ctx.run_dir)


def final_model(run_dir: Path, model: str) -> Path:
    """The last stage's exported checkpoint of a trained model."""
    return Path(run_dir) / MODEL_STEP[model] / STAGES[-1] / "final"


# ----------------------------------------------------------------------------------------------
# 1. simulate


def simulate(ctx) -> dict:
    from datasets_cfg.sim.corpus import generate

    c = ctx.cfg["simulate"]
    out = {}
    for name, scenes, seed in (("train", c["train_scenes"], c["train_seed"]), ("heldout", c["heldout_scenes"], c["heldout_seed"])):
        ctx.log(f"      {name} pool: {scenes} scenes, seed {seed}")
        s = generate(ctx.dir / name, int(scenes), envs=list(c["envs"]), seed=int(seed), synthetic_fraction=float(c["synthetic_fraction"]),
                     image_size=int(c["image_size"]), workers=int(c["workers"]), scenes_per_episode=int(c["scenes_per_episode"]),
                     progress=ctx.progress)
        out[name] = {k: s[k] for k in ("num_scenes", "sources", "environments", "lighting", "weather", "episodes_in_pool", "crash", "near_miss", "qa")}
        out[name]["path"] = _rel(ctx, ctx.dir / name)
        out[name]["seed"] = int(seed)
    logs = {n: _logs(ctx.dir / n) for n in ("train", "heldout")}
    shared = logs["train"] & logs["heldout"]
    if shared:
        raise ValueError(f"simulate: the held-out pool shares logs {sorted(shared)[:3]} with the training pool; use different seeds")
    return out


def _logs(pool_dir: Path) -> set[str]:
    from datasets_cfg.schema import ScenePool

    return {json.loads(m).get("log_name", "") for m in ScenePool.load(pool_dir).column("meta")}


# ----------------------------------------------------------------------------------------------
# 2. skills


def skills(ctx) -> dict:
    from datasets_cfg.schema import ScenePool
    from datasets_cfg.skill_annotation import annotate_pool, coverage_heatmap, coverage_table, write_coverage
    from datasets_cfg.skill_dataset import item_inputs, write_skill_dataset
    from datasets_cfg.skill_items import pool_items
    from mose.presets import preset_config
    from mose.skill_data import build_skill_dataset
    from mose.skill_tokenizer import llava_processor_for, train_chat_tokenizer

    tax = ctx.taxonomy
    out: dict = {"taxonomy": {"skills": len(tax), "roots": tax.roots, "leaves": tax.leaves}}
    tables = {}
    for name in ("train", "heldout"):
        pool, rep = annotate_pool(ScenePool.load(ctx.step_dir("simulate") / name), tax)
        dest = ctx.dir / name
        pool.save(dest)
        # images stay where the simulator wrote them: relative paths resolve through a relative link
        link = dest / "images"
        if link.is_symlink():  # left by an interrupted run of this step
            link.unlink()
        link.symlink_to(Path("..") / ".." / "simulate" / name / "images", target_is_directory=True)
        table = coverage_table(ScenePool.load(dest), tax, by="source")
        write_coverage(table, ctx.dir / f"coverage_{name}.csv")
        write_coverage(table, ctx.dir / f"coverage_{name}.md")
        tables[name] = table
        out[name] = {"annotation": rep.as_dict(), "path": _rel(ctx, dest),
                     "scenes_per_skill": {r["skill"]: r["scenes"] for r in table}}
    coverage_heatmap(tables["train"], ctx.dir / "coverage_train.png", "training pool: scenes per skill")

    # the hierarchical skill dataset of the training pool, and the tokenizer trained on its text (offline)
    train_pool = ScenePool.load(ctx.dir / "train")
    items, item_rep = pool_items(train_pool, tax)
    write_skill_dataset(ctx.dir / "items.jsonl", items, item_inputs(train_pool, tax), item_rep.as_dict())  # datasets_cfg/skill_dataset.py
    config = preset_config("tiny")
    texts = list(items["prompt"]) + list(items["target"])
    tokenizer = train_chat_tokenizer(texts, config.get_text_config().vocab_size)
    processor = llava_processor_for(config, tokenizer)
    processor.save_pretrained(ctx.dir / "processor")
    ds, data_rep = build_skill_dataset(items, processor, tax, max_length=int(ctx.cfg["skills"]["max_length"]))
    out["items"] = item_rep.as_dict() | {"count": len(items)}
    out["tokenised"] = data_rep.as_dict()
    out["items_file"] = _rel(ctx, ctx.dir / "items.jsonl")
    out["processor"] = _rel(ctx, ctx.dir / "processor")
    out["vocab_size"] = len(tokenizer)
    return out


# ----------------------------------------------------------------------------------------------
# 3. curate


def curate(ctx) -> dict:
    import yaml

    from curation.plan import load_plan, run_plan
    from pipelines.curate_hooks import feedback_factory, pilot_factory

    stages = {}
    for name, st in ctx.cfg["curate"]["stages"].items():
        st = json.loads(json.dumps(st))  # a copy
        st["pools"] = ["sim"]
        if st.get("method") == "mosaic":
            st.setdefault("params", {})["plot_dir"] = str(ctx.dir / "mosaic")
        stages[name] = st
    plan_doc = {"name": f"demo-{ctx.cfg['_scale']}", "seed": int(ctx.cfg["seed"]),
                "pools": {"sim": {"path": str(ctx.step_dir("skills") / "train")}}, "stages": stages}
    plan_path = ctx.dir / "plan.yaml"
    plan_path.write_text("# written by `mose demo`; the same as `mose curate --plan plan.yaml --out .`\n" + yaml.safe_dump(plan_doc, sort_keys=False))
    result = run_plan(load_plan(plan_path), ctx.dir, pilot_factory=pilot_factory, feedback_factory=feedback_factory, progress=ctx.progress)
    out = {"plan": _rel(ctx, plan_path), "stages": {}}
    for name, sel in result.selections.items():
        st = {"method": sel.method, "selected": len(sel), "budget": sel.budget, "ratio": sel.state["ratio"], "real": sel.state["real"],
              "synthetic": sel.state["synthetic"], "fallbacks": [f.get("what") for f in sel.fallbacks],
              "skills_min": sel.state["skills"]["min"], "manifest": _rel(ctx, result.manifests[name])}
        if sel.method == "mosaic":
            ms = next(iter(sel.state["method_state"].values()))
            st["mosaic"] = {k: ms[k] for k in ("domains", "fits", "allocation", "predicted_gain", "predicted_gain_raw", "predicted_gain_clipped",
                                               "predicted_gain_note", "predicted_score", "score_bounds", "pilot") if k in ms}
            st["mosaic"]["plots"] = {k: _rel(ctx, v) for k, v in (ms.get("plots") or {}).items()}
        out["stages"][name] = st
    out["coverage"] = _rel(ctx, result.coverage_csv)
    return out


# ----------------------------------------------------------------------------------------------
# 4-5. training


def _train_config(ctx, output_dir: Path, extra: dict | None = None):
    from importlib.resources import files

    from training.config import load_config

    t = ctx.cfg["train"]
    ds = t.get("deepspeed", "zero2")
    ov = {"run.output_dir": str(output_dir), "run.seed": int(ctx.cfg["seed"]), "run.progress": bool(ctx.progress),
          "run.save_steps": int(t.get("save_steps", 50)),
          "run.deepspeed": None if ds in (None, "none") else str(Path(str(files("training"))) / "deepspeed" / f"{ds}.json"),
          "data.pool": str(ctx.step_dir("skills") / "train"), "data.manifests": str(ctx.step_dir("curate")),
          "data.max_length": int(ctx.cfg["skills"]["max_length"]), "model.processor": str(ctx.step_dir("skills") / "processor")}
    ov["model.preset_args"] = {"trajectory_decoder": str(t.get("trajectory_decoder", "text"))}
    for stage, keys in (t.get("stages") or {}).items():
        for k, v in keys.items():
            ov[f"stages.{stage}.{k}"] = v
    ov.update(extra or {})
    return load_config(Path(str(files("training"))) / "configs" / "tiny.yaml", ov)


def _train_summary(ctx, result: dict) -> dict:
    from mose.config import MoSEConfig
    from mose.presets import count_parameters

    final = Path(result["final"])
    counts = count_parameters(MoSEConfig.from_pretrained(str(final)), method="meta")
    stages = {}
    for name, s in result["stages"].items():
        log = [json.loads(line) for line in (ctx.dir / name / "log.jsonl").read_text().splitlines() if line.strip()]
        stages[name] = {"steps": s["steps"], "train_loss": s["train_loss"], "last_loss": s["last_loss"], "scenes": s["scenes"], "items": s["items"],
                        "trainable_groups": s["trainable_groups"], "trainable_params": sum(r[1] for r in s["trainable"].values()),
                        "recipe": s.get("recipe"), "plan_refit": s.get("plan_refit"),
                        "losses": s["losses"], "lora": s["lora"], "deepspeed": Path(s["deepspeed"]).name if s["deepspeed"] else None,
                        "loss_curve": [[r["step"], r["loss"]] for r in log if "loss" in r]}
    return {"final": _rel(ctx, final), "parameters": counts, "stages": stages}


def train(ctx) -> dict:
    from training.runner import run_training

    result = run_training(_train_config(ctx, ctx.dir), progress=ctx.progress)
    return _train_summary(ctx, result) | {"model": "MoSE tiny preset (random init): 4 experts, top-2, every other layer"}


def dense_init(processor_dir: Path, out: Path, seed: int, tax, trajectory_decoder: str = "text") -> Path:
    """The tiny preset's backbone with ONE expert per MoE layer, top_k x the experts' FFN width (and MoSE's shared
    expert, if any): the same activated parameters and FLOPs per token as MoSE, nothing to route; top-1 of 1 with
    weight 1 is exactly a dense SwiGLU FFN. The vocabulary and image token follow the run's tokenizer (as
    training/model_setup.py does for the preset). Every skill maps to that one expert (the trainer passes skill
    labels; with one expert they route nowhere else). `trajectory_decoder` as MoSE's."""
    import torch

    from mose.config import MoSEConfig
    from mose.modeling import MoSEForConditionalGeneration
    from mose.presets import PRESETS, base_config
    from training.model_setup import load_processor

    processor = load_processor(processor_dir)
    tok = processor.tokenizer
    base = base_config("tiny")
    base.text_config.vocab_size = len(tok)
    base.image_token_index = tok.convert_tokens_to_ids(processor.image_token)
    base.text_config.pad_token_id, base.text_config.bos_token_id, base.text_config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(seed)
    mose = MoSEConfig(base_config=base, **PRESETS["tiny"].moe_options)
    model = MoSEForConditionalGeneration(MoSEConfig(
        base_config=base, num_experts=1, top_k=1, moe_layers=mose.moe_layers, shared_expert=mose.shared_expert,
        expert_intermediate_size=mose.num_experts_per_tok * mose.expert_ffn_size, trajectory_decoder=trajectory_decoder,
        skill_groups={n: [0] for n in tax.names}, skill_parents={n: tax.root_of(n) for n in tax.names if tax.parent(n) is not None}))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def train_dense(ctx) -> dict:
    from training.runner import run_training

    init = dense_init(ctx.step_dir("skills") / "processor", ctx.dir / "init", int(ctx.cfg["seed"]), ctx.taxonomy,
                      str(ctx.cfg["train"].get("trajectory_decoder", "text")))
    # the dense init is a random-init checkpoint (model.path), which "auto" would take for pretrained: it gets the
    # recipe the MoSE run resolves for the same random-init backbone, so both train the same parameter groups
    from training.stages import resolve_recipe

    recipe = resolve_recipe(_train_config(ctx, ctx.dir).model.recipe, random_init=True)
    extra = {"model.preset": None, "model.path": str(init), "model.recipe": recipe}
    for stage in STAGES:  # no router: no balance, z or skill loss
        extra[f"stages.{stage}.losses"] = {"lm": 1.0, "balance": 0.0, "z": 0.0, "skill": 0.0}
    extra["stages.router_pretrain.trainable"] = list(ctx.cfg["dense"]["router_pretrain_trainable"])
    result = run_training(_train_config(ctx, ctx.dir, extra), progress=ctx.progress)
    return _train_summary(ctx, result) | {
        "model": "dense baseline: the tiny backbone with one expert per MoE layer (a dense FFN of MoSE's activated width), "
                 "same data, stages and steps",
        "router_pretrain_trainable": extra["stages.router_pretrain.trainable"]}


# ----------------------------------------------------------------------------------------------
# 6. evaluate


def judge_settings(cfg: dict) -> dict | None:
    """The CODA judge: evaluate.judge (set from MOSE_JUDGE_URL + MOSE_JUDGE_MODEL by pipelines.demo.load_demo_config), with the
    name of the variable holding the key: $MOSE_JUDGE_API_KEY if set, else $OPENAI_API_KEY (the key itself is never stored)."""
    judge = cfg["evaluate"].get("judge")
    if not judge:
        return None
    return dict(judge, key_env="MOSE_JUDGE_API_KEY" if os.environ.get("MOSE_JUDGE_API_KEY") else "OPENAI_API_KEY")


def coda_eval(ctx, model_dir: Path, out: Path) -> dict:
    """`mose eval coda` on the held-out pool (its CODA-style qa), answers generated by the checkpoint (the typed API)."""
    from eval.coda_lm import CodaEvalOptions, evaluate

    e = ctx.cfg["evaluate"]
    judge = judge_settings(ctx.cfg) or {}
    options = CodaEvalOptions(annotations=str(ctx.step_dir("skills") / "heldout"), model=str(model_dir), out=str(out),
                              batch_size=int(e["batch_size"]), max_new_tokens=int(e["qa_max_new_tokens"]), dtype="float32",
                              judge_url=judge.get("url"), judge_model=judge.get("model"), judge_key_env=judge.get("key_env", "OPENAI_API_KEY"),
                              region_extended=True)  # simulator categories are not in the official CODA-LM region table
    result = evaluate(options)
    scores = result.scores
    return {"offline": scores["offline"], "judge": scores["judge"], "judge_scores": scores["judge_scores"], "counts": scores["counts"],
            "judge_endpoint_down": result.judge_endpoint_down, "scores": _rel(ctx, out / "scores.json")}


def _epdms(ctx, scenes, trajectories: dict, reasons: dict, out_csv: Path) -> dict:
    """Score trajectories on the held-out scenes; scenes in `reasons` (no usable prediction) become invalid rows with that reason."""
    from eval.navsim.predictions import write_scores_csv
    from eval.navsim.scorer import average_row, mean_score, score_scenes

    e = ctx.cfg["evaluate"]
    rows = score_scenes(scenes, trajectories, metric=e["metric"], tracking=bool(e["tracking"]), progress=False)
    for r in rows:
        if not r["valid"] and r["token"] in reasons:
            r["reason"] = reasons[r["token"]]
    avg = average_row(rows, e["metric"])
    write_scores_csv(out_csv, rows, avg)
    valid = [r for r in rows if r["valid"]]
    subs = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in avg.items() if k not in ("token", "valid", "reason", "score")}
    return {"metric": e["metric"], "scenes": len(rows), "valid": len(valid), "invalid": len(rows) - len(valid),
            "mean_score": mean_score(rows), "mean_score_valid": mean_score(rows, valid_only=True) if valid else None,
            "submetrics_valid_mean": subs, "invalid_reasons": dict(Counter(r["reason"].split(":")[0] for r in rows if not r["valid"])),
            "scores_csv": _rel(ctx, out_csv)}


def training_items(ctx, kind: str):
    """The training pool's skill-dataset items of one kind, read from the file the skills step wrote
    (`skills/items.jsonl`, datasets_cfg/skill_dataset.py) instead of building them again."""
    from datasets_cfg.skill_dataset import items_dataset, read_skill_dataset

    return items_dataset(it for it in read_skill_dataset(ctx.step_dir("skills") / "items.jsonl").items if it["kind"] == kind)


def plan_budget(ctx, model_dir: Path, cap, where: str) -> dict:
    """The step-by-step answer's generation budget: the longest hierarchical target of the training pool in the
    checkpoint's tokens plus a margin (mose/answer_grammar.py answer_budget), capped by the config value `where` if set."""
    from mose.answer_grammar import answer_budget, longest_target_tokens
    from training.model_setup import load_processor

    longest = longest_target_tokens(training_items(ctx, "hierarchical")["target"], load_processor(model_dir).tokenizer)
    return {"longest_target_tokens": longest, "cap": None if cap is None else int(cap),
            "max_new_tokens": answer_budget(longest, None if cap is None else int(cap), where=where)}


def plan_eval(ctx, model_dir: Path, scenes, out: Path) -> dict:
    """The checkpoint's step-by-step answer per held-out scene -> trajectory -> EPDMS (unparseable = invalid row)."""
    from datasets_cfg.skill_items import hierarchical_prompt
    from eval.coda_generate import Generator, read_predictions_log
    from eval.navsim.predictions import write_predictions
    from eval.vlm_planner import answer_to_poses, checkpoint_decoder, head_plan

    e = ctx.cfg["evaluate"]
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for s in scenes:
        image = s.image_paths(frame=s.current_index) or s.image_paths()[-1:]  # as the training items pick it
        if not image:
            raise ValueError(f"held-out scene {s.id}: field 'images': expected an image of the current frame, got none")
        records.append({"question_id": s.id, "task": "planning", "question": hierarchical_prompt(s.row, ctx.taxonomy), "image": str(image[0])})
    budget = plan_budget(ctx, model_dir, e.get("plan_max_new_tokens"), "evaluate.plan_max_new_tokens")
    gen = Generator(str(model_dir), batch_size=int(e["batch_size"]), max_new_tokens=budget["max_new_tokens"],
                    constrained=bool(e.get("plan_constrained", True)), taxonomy=ctx.taxonomy)
    gen.run(records, out / "answers.jsonl", progress=ctx.progress)
    answers = {k: v["answer"] for k, v in read_predictions_log(out / "answers.jsonl").items()}
    decoder = checkpoint_decoder(model_dir)  # "head": the planning head's poses, written into the answer
    if decoder == "head" and not hasattr(gen, "model_"):
        gen.load()
    trajectories, reasons, parsed = {}, {}, []
    for s, rec in zip(scenes, records):
        context = {"plan_xy": head_plan(gen, rec["question"], rec["image"])} if decoder == "head" else None
        poses, info = answer_to_poses(answers.get(s.id, ""), ctx.taxonomy, decoder=decoder, context=context)
        parsed.append({"scene": s.id, **info})
        if poses is None:
            reasons[s.id] = info["reason"]
        else:
            trajectories[s.id] = poses
    write_jsonl(out / "parsed.jsonl", parsed)
    write_predictions(out / "trajectories.json", trajectories)
    res = _epdms(ctx, scenes, trajectories, reasons, out / "epdms_scores.csv")
    res["format"] = {"answers": len(parsed), "format_ok": sum(p["format_ok"] for p in parsed),
                     "trajectory_complete": len(trajectories), "mean_trajectory_points": sum(p["trajectory_points"] for p in parsed) / max(len(parsed), 1)}
    res["answers"] = _rel(ctx, out / "answers.jsonl")
    res["budget"] = budget
    res["decoder"] = decoder
    return res


def routing_eval(ctx, model_dir: Path, out: Path) -> dict:
    """Routing of the held-out hierarchical items: accuracy per skill group, usage heatmap (mose/routing_eval.py)."""
    from datasets_cfg.schema import ScenePool
    from datasets_cfg.skill_items import pool_items
    from mose.modeling import MoSEForConditionalGeneration
    from mose.routing_eval import evaluate_routing, labelled_tokens, token_identity_accuracy, usage_heatmap
    from mose.skill_data import SkillCollator, build_skill_dataset
    from training.model_setup import load_processor

    tax = ctx.taxonomy
    processor = load_processor(model_dir)
    items, _ = pool_items(ScenePool.load(ctx.step_dir("skills") / "heldout"), tax, kinds=("hierarchical",))
    ds, rep = build_skill_dataset(items, processor, tax, max_length=int(ctx.cfg["skills"]["max_length"]))
    model = MoSEForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    if list(model.config.skill_groups or {}) != tax.names:
        raise ValueError(f"{model_dir}/config.json: skill_groups must list the taxonomy's skills in skill-id order "
                         f"{tax.names}, got {list(model.config.skill_groups or {})}")
    metrics = evaluate_routing(model, ds, SkillCollator(processor), tax, batch_size=int(ctx.cfg["evaluate"]["batch_size"]))
    # the reference a learned router must beat: the best router that sees only the token's identity, fitted on the
    # training pool's hierarchical items (same tokenizer), scored on the same held-out tokens
    train_ds, _ = build_skill_dataset(training_items(ctx, "hierarchical"), processor, tax, max_length=int(ctx.cfg["skills"]["max_length"]))
    token_router = token_identity_accuracy(labelled_tokens(train_ds), labelled_tokens(ds), tax, model.config.skill_groups,
                                           model.config.num_experts, len(processor.tokenizer))
    png = usage_heatmap(metrics, tax, model.config.skill_groups, out / "routing_heatmap.png",
                        title=f"expert usage per skill (held-out)\ntop-1 in group: coarse {metrics.coarse_accuracy:.2f}, "
                              f"fine {metrics.fine_accuracy:.2f}")
    res = metrics.as_dict() | {"usage": metrics.usage.round(4).tolist(), "skills": tax.names, "items": len(ds),
                               "skill_groups": model.config.skill_groups, "heatmap": _rel(ctx, png), "token_identity_router": token_router}
    write_json(out / "routing.json", res)
    return res


def evaluate(ctx) -> dict:
    from datasets_cfg.schema import ScenePool
    from eval.navsim.agents import run_agent

    pool = ScenePool.load(ctx.step_dir("skills") / "heldout")
    scenes = list(pool)
    out = {"heldout_scenes": len(scenes), "judge": ctx.cfg["evaluate"].get("judge"),
           "models": {}, "references": {}}
    for model in MODELS:
        mdir = final_model(ctx.run_dir, model)
        ctx.log(f"      {model}: CODA-style QA")
        res = {"coda": coda_eval(ctx, mdir, ctx.dir / "coda" / model)}
        ctx.log(f"      {model}: planned trajectories -> {ctx.cfg['evaluate']['metric'].upper()}")
        res["planning"] = plan_eval(ctx, mdir, scenes, ctx.dir / "planning" / model)
        if model == "mose":
            ctx.log("      mose: routing per skill")
            res["routing"] = routing_eval(ctx, mdir, ctx.dir / "routing")
        out["models"][model] = res
    for agent in ctx.cfg["evaluate"]["references"]:
        ctx.log(f"      reference agent {agent}")
        trajectories = run_agent(agent, scenes)
        missing = {s.id: f"{agent} cannot plan this scene" for s in scenes if s.id not in trajectories}
        out["references"][agent] = _epdms(ctx, scenes, trajectories, missing, ctx.dir / "planning" / f"ref_{agent}_scores.csv")
    write_json(ctx.dir / "results.json", out)
    return out


# ----------------------------------------------------------------------------------------------
# 7. closed loop


def closed_loop(ctx) -> dict:
    from eval.closed_loop import constant_velocity_planner, pdm_closed_planner, run_closed_loop
    from eval.vlm_planner import ModelPlanner

    c = ctx.cfg["closed_loop"]
    image_size = int(ctx.cfg["simulate"]["image_size"])
    budgets = {m: plan_budget(ctx, final_model(ctx.run_dir, m), c.get("max_new_tokens"), "closed_loop.max_new_tokens") for m in MODELS}
    planners = {m: ModelPlanner(final_model(ctx.run_dir, m), budgets[m]["max_new_tokens"], image_size, int(c["replan_every"]),
                                constrained=bool(c.get("constrained", True)), taxonomy=ctx.taxonomy) for m in MODELS}
    refs = {"pdm_closed": pdm_closed_planner, "constant_velocity": constant_velocity_planner}
    for r in c["references"]:
        if r not in refs:
            raise ValueError(f"closed_loop.references: unknown planner {r!r}; expected some of {sorted(refs)}")
        planners[r] = refs[r]()
    out = {"envs": list(c["envs"]), "episodes": int(c["episodes"]), "duration_s": float(c["duration_s"]), "seed": int(ctx.cfg["seed"]),
           "planners": {}}
    for name, planner in planners.items():
        ctx.log(f"      {name}: {c['episodes']} episode(s) of {c['duration_s']} s")
        result = run_closed_loop(planner, envs=list(c["envs"]), episodes=int(c["episodes"]), seed=int(ctx.cfg["seed"]) + 500,
                                 duration_s=float(c["duration_s"]), progress=ctx.progress)
        result.to_json(ctx.dir / f"{name}.json")
        res = {"means": result.means, "file": _rel(ctx, ctx.dir / f"{name}.json")}
        if isinstance(planner, ModelPlanner):
            write_jsonl(ctx.dir / f"{name}_decisions.jsonl", planner.decisions_)
            asked = [x for x in planner.decisions_ if not x["followed_last_plan"]]
            res["decisions"] = {"total": len(planner.decisions_), "model_calls": len(asked), "replan_every": planner.replan_every,
                                "trajectory_parsed": sum(not x["reason"] for x in asked), "format_ok": sum(bool(x["format_ok"]) for x in asked),
                                "image": "drawn from the observation (closed-loop observations carry no render)", "budget": budgets[name]}
            planner.close()
        out["planners"][name] = res
    write_json(ctx.dir / "results.json", out)
    return out


# ----------------------------------------------------------------------------------------------
# 8. report


def report(ctx) -> dict:
    from pipelines.demo_report import build_report

    return build_report(ctx.run_dir, ctx.dir)
