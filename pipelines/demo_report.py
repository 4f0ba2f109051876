"""The `mose demo` report: `report.md` with tables and PNG plots, generated from the run's step outputs only.

    build_report("runs/demo", "runs/demo/report")   # -> {"report": ..., "figures": [...], "numbers": {...}}

Every number comes from a file a step wrote (`<step>/summary.json`, `.done.json` markers, manifests' coverage CSV,
`evaluate/results.json`, `closed_loop/results.json`, training `log.jsonl`); nothing is typed in. Numbers are printed
with `fmt` (4 decimals for fractions and scores), so a table cell can be checked against its source file.
Figures: skill coverage per stage, MOSAIC scaling curves and allocation (drawn by curation/mosaic.py), the routing
heatmap per skill (mose/routing_eval.py), training losses, scores vs the dense baseline, closed-loop results.

Honesty rules of the report (OURS):
- one colour per planner (model or reference) in every plot: `planner_color`;
- closed loop: a crashed episode scores 0 (eval/closed_loop.py `episode_score`), recomputed from the episodes of
  `closed_loop/<planner>.json`, the crash count next to the mean, planners ranked by that mean;
- object recall / precision only over well-formed answers (eval/coda_scores.py `degenerate_reason`), with the
  count of degenerate answers; a model whose answers are all degenerate gets no bar, the label "degenerate answers";
- MOSAIC's predicted gain as bounded by the pilot metric's range (curation/scaling.py `bounded_gain`), the
  law's raw sum beside it when clipped, and a sentence on U₀ = 0 when the base score is 0.
"""
from __future__ import annotations

import csv
import json
import math
import platform
import shutil
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

STEP_ORDER = ("simulate", "skills", "curate", "train", "train_dense", "evaluate", "closed_loop", "report")
MODEL_NAMES = {"mose": "MoSE", "dense": "dense baseline"}
REF_NAMES = {"human": "human (logged future)", "pdm_closed": "PDM-Closed", "constant_velocity": "constant velocity"}
# one colour per planner in every figure of the report (matplotlib's tab10 colours, fixed per name)
PLANNER_COLORS = {"mose": "#1f77b4", "dense": "#ff7f0e", "human": "#2ca02c", "pdm_closed": "#9467bd", "constant_velocity": "#8c564b"}
_OTHER_COLORS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#d62728")
DEGENERATE = "degenerate answers"  # a plotted value: no bar, this label instead


def planner_color(name: str) -> str:
    """The colour of planner `name` in every plot: fixed for the known names, else chosen by a hash of the name
    (so the same in every figure and every run)."""
    return PLANNER_COLORS.get(name) or _OTHER_COLORS[zlib.crc32(name.encode()) % len(_OTHER_COLORS)]


def display_name(name: str) -> str:
    return MODEL_NAMES.get(name, REF_NAMES.get(name, name))


def fmt(v, digits: int = 4) -> str:
    """Table cell: n/a for missing / NaN, integers as they are, floats with `digits` decimals."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]
    return "\n" + "\n".join(lines) + "\n\n"  # blank lines around: a following paragraph must not join the table


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def _save(fig, path: Path) -> Path:
    from common.atomic import save_figure

    return save_figure(fig, path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------
# figures


def stage_coverage(coverage_csv: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(skills, stages, selected (S, T), available (S, T)) summed over sources and environments of the plan's coverage CSV."""
    sel, avail = defaultdict(int), defaultdict(int)
    skills, stages = [], []
    with open(coverage_csv, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["skill"] not in skills:
                skills.append(r["skill"])
            if r["stage"] not in stages:
                stages.append(r["stage"])
            sel[r["skill"], r["stage"]] += int(r["selected"])
            avail[r["skill"], r["stage"]] += int(r["available"])
    S = np.array([[sel[s, t] for t in stages] for s in skills])
    A = np.array([[avail[s, t] for t in stages] for s in skills])
    return skills, stages, S, A


def plot_stage_coverage(skills, stages, S, budgets: dict, path: Path, depth: dict) -> Path:
    plt = _plt()
    frac = S / np.maximum(np.array([budgets.get(t, 1) for t in stages])[None, :], 1)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(stages), 0.34 * len(skills) + 1.4))
    im = ax.imshow(frac, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(stages)), [f"{t}\n({budgets.get(t, '?')} scenes)" for t in stages], fontsize=8)
    ax.set_yticks(range(len(skills)), [("· " * depth.get(s, 0)) + s for s in skills], fontsize=8)
    for (i, j), v in np.ndenumerate(S):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if frac[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="share of the stage's scenes")
    ax.set_title("skill coverage per training stage (selected scenes)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def losses_figure(train: dict, dense: dict):
    plt = _plt()
    stages = list(train.get("stages", {}))
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(4.2 * max(len(stages), 1), 3.2), squeeze=False)
    for ax, st in zip(axes[0], stages):
        for name, summ, style in (("mose", train, "-o"), ("dense", dense, "--s")):
            curve = np.array(summ.get("stages", {}).get(st, {}).get("loss_curve", []), dtype=float).reshape(-1, 2)
            if len(curve):
                ax.plot(curve[:, 0], curve[:, 1], style, ms=3, label=display_name(name), color=planner_color(name))
        ax.set_title(st, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.suptitle("training loss per stage (LM + routing losses; the dense model has LM loss only)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_losses(train: dict, dense: dict, path: Path) -> Path:
    return _save(losses_figure(train, dense), path)


def object_recall_value(model_result: dict):
    """The plotted object recall of a model: over well-formed answers only; DEGENERATE when every answer is degenerate
    (nothing to score), None when not computed or no scene could be scored."""
    wf = _get(model_result, "coda", "offline", "object_recall", "well_formed")
    if not wf:
        return None
    if wf.get("answers") and wf.get("degenerate") == wf.get("answers"):
        return DEGENERATE
    return _num(wf.get("recall"))


def scores_figure(ev: dict, cl_means: dict):
    """Held-out scores and closed-loop results, MoSE vs dense (references where they exist); `cl_means`: planner ->
    closed-loop means (crash = 0). A value None is drawn as "n/a", DEGENERATE as "degenerate answers": no bar."""
    plt = _plt()
    from matplotlib.patches import Patch

    models = [m for m in ("mose", "dense") if m in ev.get("models", {})]
    panels = []
    qa = [("BLEU-4 /100 (general)", lambda r: _get(r, "coda", "offline", "general", "bleu4"), 100.0),
          ("ROUGE-L (general)", lambda r: _get(r, "coda", "offline", "general", "rouge_l"), 1.0),
          ("CIDEr-D /10 (general)", lambda r: _get(r, "coda", "offline", "general", "cider_d"), 10.0)]
    groups = [(n, [(_num(f(ev["models"][m])) or 0.0) / s for m in models]) for n, f, s in qa]
    groups.append(("object recall\n(well-formed answers)", [object_recall_value(ev["models"][m]) for m in models]))
    panels.append(("CODA-style QA (held-out)", groups, models))
    names = models + list(ev.get("references", {}))
    ep = [_get(ev["models"][m], "planning", "mean_score") if m in ev["models"] else _get(ev["references"][m], "mean_score") for m in names]
    panels.append(("EPDMS of planned trajectories (invalid = 0)", [("EPDMS", [_num(v) or 0.0 for v in ep])], names))
    cl_names = list(cl_means)
    keys = [("route completion", "route_completion"), ("crash rate", "crash_rate"), ("EPDMS (executed,\ncrash = 0)", "epdms")]
    panels.append(("closed loop", [(lab, [_num(cl_means[p].get(k)) for p in cl_names]) for lab, k in keys], cl_names))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.8))
    for ax, (title, groups, who) in zip(axes, panels):
        width = 0.8 / max(len(who), 1)
        x = np.arange(len(groups))
        for k, name in enumerate(who):
            xs = x + (k - (len(who) - 1) / 2) * width
            vals = [g[1][k] for g in groups]
            drawn = [(xi, v) for xi, v in zip(xs, vals) if isinstance(v, float)]
            if drawn:
                bars = ax.bar([d[0] for d in drawn], [d[1] for d in drawn], width, label=display_name(name), color=planner_color(name))
                for b, (_, v) in zip(bars, drawn):
                    ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.2f}", ha="center", va="bottom", fontsize=6)
            for xi, v in zip(xs, vals):
                if not isinstance(v, float):  # no bar: say why
                    ax.text(xi, 0.02, DEGENERATE if v == DEGENERATE else "n/a", ha="center", va="bottom", fontsize=6, rotation=90,
                            color=planner_color(name))
        ax.set_xticks(x, [g[0] for g in groups], fontsize=7, rotation=15)
        ax.set_xlim(-0.5, len(groups) - 0.5)  # groups without bars keep their place
        ax.set_ylim(0, 1.1)
        ax.set_title(title, fontsize=9)
        ax.legend(handles=[Patch(color=planner_color(n), label=display_name(n)) for n in who], fontsize=6)
    fig.tight_layout()
    return fig


def plot_scores(ev: dict, cl_means: dict, path: Path) -> Path:
    return _save(scores_figure(ev, cl_means), path)


def plot_routing(rt: dict, depth: dict, path: Path) -> Path:
    """Skills (rows, those with held-out tokens) x experts: share of the skill's top-k choices, its own experts outlined."""
    from matplotlib.patches import Rectangle

    plt = _plt()
    usage = np.asarray(rt["usage"], dtype=float)
    rows = [i for i in range(len(usage)) if usage[i].sum() > 0]
    names = [rt["skills"][i] for i in rows]
    data = usage[rows]
    fig, ax = plt.subplots(figsize=(3.2 + 0.8 * data.shape[1], 0.38 * len(rows) + 1.6))
    im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(len(rows)), [("· " * depth.get(n, 0)) + n for n in names], fontsize=8)
    ax.set_xticks(range(data.shape[1]), [f"expert {e}" for e in range(data.shape[1])], fontsize=8)
    for r, n in enumerate(names):
        for e in rt["skill_groups"].get(n, []):
            ax.add_patch(Rectangle((e - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5))
        for e, v in enumerate(data[r]):
            ax.text(e, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > 0.5 else "white")
    fig.colorbar(im, ax=ax, label="share of the skill's expert choices")
    ax.set_title(f"MoSE routing per skill, held-out (all MoE layers)\ntop-1 inside its experts (outlined): coarse "
                 f"{rt['coarse_accuracy']:.2f}, fine {rt['fine_accuracy']:.2f}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


# ----------------------------------------------------------------------------------------------
# sections


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mose-driving", "torch", "transformers", "deepspeed", "datasets", "peft", "highway-env", "gymnasium", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build_report(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write out_dir/report.md and out_dir/figures/*.png from the step outputs in run_dir; returns what was used."""
    from common.atomic import write_text
    from mose.skills import load_taxonomy

    run, out = Path(run_dir), Path(out_dir)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    S = {s: _load(run / s / "summary.json") for s in STEP_ORDER}
    markers = {s: _load(run / s / ".done.json") for s in STEP_ORDER}
    sim, sk, cur, tr, dn, ev, cl = (S[k] for k in ("simulate", "skills", "curate", "train", "train_dense", "evaluate", "closed_loop"))
    cfg_marker = markers.get("simulate", {}).get("config", {})
    tax = load_taxonomy()
    depth = {n: tax.depth(n) for n in tax.names}
    md: list[str] = []
    figures: dict[str, str] = {}
    numbers: dict = {}

    md.append("# MoSE demo report\n\n")
    md.append("Everything below was produced by this run of `mose demo` (simulated scenes, a tiny random-init model trained "
              "for minutes on the CPU). Every number is read from the step outputs named under each table. The tiny model "
              "is not expected to drive well: the point is the pipeline, and the numbers say what it does.\n")

    # --- run metadata -----------------------------------------------------------------------
    md.append("## Run\n\n")
    seed = cfg_marker.get("seed")
    meta_rows = [["scale", str(markers.get("simulate", {}).get("scale", "n/a"))], ["settings", str(markers.get("simulate", {}).get("settings", "n/a"))],
                 ["seed", fmt(seed)]]
    meta_rows += [[k, v] for k, v in _versions().items()]
    md.append(table(["", "value"], meta_rows))
    rows, total = [], 0.0
    for s in STEP_ORDER[:-1]:
        m = markers.get(s) or {}
        total += float(m.get("seconds") or 0)
        rows.append([s, fmt(m.get("seconds"), 1), m.get("finished_at", "n/a"), m.get("hash", "n/a")])
    rows.append(["total (steps 1-7)", fmt(total, 1), "", ""])
    md.append("Wall time per step (seconds the step took when it ran; from `<step>/.done.json`):\n\n")
    md.append(table(["step", "seconds", "finished (UTC)", "config hash"], rows))
    numbers["wall_seconds"] = {s: (markers.get(s) or {}).get("seconds") for s in STEP_ORDER[:-1]}

    # --- data ---------------------------------------------------------------------------------
    md.append("## Data: simulated pools\n\n")
    rows = []
    for name in ("train", "heldout"):
        p = sim.get(name, {})
        rows.append([name, p.get("num_scenes"), p.get("sources", {}).get("real", 0), p.get("sources", {}).get("synthetic", 0),
                     p.get("episodes_in_pool"), ", ".join(f"{k} {v}" for k, v in sorted(p.get("environments", {}).items())),
                     p.get("crash"), p.get("near_miss"), p.get("seed")])
    md.append(table(["pool", "scenes", "real", "synthetic", "logs", "environments", "crash", "near miss", "seed"], rows))
    md.append("Source: `simulate/summary.json` (highway-env via `datasets_cfg/sim/corpus.py`). Real = default simulator "
              "settings, synthetic = perturbed traffic, events and renders. The held-out pool uses another seed: no shared log.\n\n")

    # --- skills and coverage ------------------------------------------------------------------
    md.append("## Skills: annotation and coverage per stage\n\n")
    skills_n, stages_n, Ssel, Savail = stage_coverage(run / "curate" / "coverage.csv") if (run / "curate" / "coverage.csv").is_file() else ([], [], np.zeros((0, 0)), None)
    budgets = {k: v.get("budget") for k, v in cur.get("stages", {}).items()}
    if skills_n:
        figures["skill_coverage"] = str(plot_stage_coverage(skills_n, stages_n, Ssel, budgets, figs / "skill_coverage.png", depth).relative_to(out))
        tokens = _get(sk, "tokenised", "tokens_per_skill") or {}
        rows = []
        for i, s in enumerate(skills_n):
            rows.append([("&nbsp;&nbsp;" * depth.get(s, 0)) + s, _get(sk, "train", "scenes_per_skill", s), _get(sk, "heldout", "scenes_per_skill", s)]
                        + [int(Ssel[i, j]) for j in range(len(stages_n))] + [tokens.get(s)])
        md.append(table(["skill", "train pool scenes", "held-out scenes"] + [f"{t} scenes" for t in stages_n] + ["labelled tokens (train items)"], rows))
        md.append(f"\n![skill coverage per stage]({figures['skill_coverage']})\n\n")
    items = sk.get("items", {})
    md.append(f"Hierarchical skill dataset of the training pool: {fmt(items.get('count'))} items "
              f"({', '.join(f'{k} {v}' for k, v in sorted(items.get('items', {}).items()))}); skipped: "
              f"{json.dumps(items.get('skipped', {}))}; tokenised: {fmt(_get(sk, 'tokenised', 'items_out'))} of "
              f"{fmt(_get(sk, 'tokenised', 'items_in'))} (skipped {json.dumps(_get(sk, 'tokenised', 'skipped') or {})}). "
              f"Tokenizer: byte-level BPE trained offline on these texts, vocabulary {fmt(sk.get('vocab_size'))} "
              "(`mose/skill_tokenizer.py`). Sources: `skills/summary.json`, `curate/coverage.csv`.\n\n")

    # --- curation -----------------------------------------------------------------------------
    md.append("## Curation: the stage plan\n\n")
    rows = [[name, st.get("method"), f"{st.get('selected')}/{st.get('budget')}", st.get("ratio"),
             ", ".join(f"{k}≥{v.get('required', v) if isinstance(v, dict) else v}" for k, v in (st.get("skills_min") or {}).items()) or "-",
             ", ".join(st.get("fallbacks") or []) or "-"] for name, st in cur.get("stages", {}).items()]
    md.append(table(["stage", "method", "selected / budget", "real:synthetic", "skill minimums", "fallbacks recorded"], rows))
    md.append("Source: `curate/plan_summary.json`, `curate/<stage>.header.json` (the plan is `curate/plan.yaml`).\n\n")
    for name, st in cur.get("stages", {}).items():
        ms = st.get("mosaic")
        if not ms:
            continue
        md.append(f"### MOSAIC ({name}): scaling curves and allocation\n")
        dom = ms["domains"]
        rows = []
        for i, d in enumerate(dom["names"]):
            f = ms["fits"].get(d, {})
            pts = ms.get("pilot", {}).get("points", {}).get(d, {})
            rows.append([d, dom["sizes"][i], f.get("a"), f.get("tau"), f.get("status", ""), ", ".join(f"{n}:{g:.3f}" for n, g in zip(pts.get("n", []), pts.get("gain", []))) or "-",
                         ms["allocation"].get(d)])
        md.append(table(["domain", "scenes", "a (fitted gain)", "τ (scenes)", "fit", "pilot points n:ΔU", "allocated"], rows))
        gain, u0_note = mosaic_gain(ms)
        if gain is None:
            said = "predicted gain of the allocation n/a"
        elif gain["clipped"]:
            said = (f"predicted gain of the allocation {fmt(gain['predicted_gain'])}, the fitted laws' sum {fmt(gain['predicted_gain_raw'])} "
                    f"clipped to what the metric allows (predicted score U₀ + gain ≤ {fmt(gain['score_bounds'][1])}; the allocation "
                    "uses the laws as fitted)")
        else:
            said = f"predicted gain of the allocation {fmt(gain['predicted_gain'])}"
        if gain is not None and gain.get("predicted_score") is not None:
            said += f", predicted pilot score {fmt(gain['predicted_score'])}"
        md.append(f"ΔU = gain in the fast pilot planner's EPDMS (0-1) on its held-out pilot scenes (eval/pilot.py) over the base run's "
                  f"U₀ = {fmt(_get(ms, 'pilot', 'base_score'))} ({fmt(_get(ms, 'pilot', 'base_size'))} scenes)"
                  f"{f' ({u0_note})' if u0_note else ''}; fitted ΔU(n) = a(1 - exp(-n/τ)) per domain; {said}. "
                  f"Domains: {dom.get('source')}. Source: `curate/{name}.header.json`.\n\n")
        numbers[f"mosaic_{name}_predicted_gain"] = None if gain is None else gain["predicted_gain"]
        for key, label in (("fits", "MOSAIC scaling curves"), ("allocation", "MOSAIC allocation")):
            src = ms.get("plots", {}).get(key)
            if src and (run / src).is_file():
                dst = figs / f"mosaic_{key}.png"
                shutil.copyfile(run / src, dst)
                figures[f"mosaic_{key}"] = str(dst.relative_to(out))
                md.append(f"![{label}]({figures[f'mosaic_{key}']})\n")
        md.append("\n")

    # --- training -----------------------------------------------------------------------------
    md.append("## Training\n\n")
    rows = []
    for label, summ in (("MoSE", tr), ("dense", dn)):
        p = summ.get("parameters", {})
        for st, s in summ.get("stages", {}).items():
            rows.append([label, st, s.get("steps"), s.get("scenes"), s.get("items"), ", ".join(s.get("trainable_groups", [])), s.get("trainable_params"),
                         s.get("train_loss"), s.get("last_loss")])
        rows.append([label, "parameters", "", "", "", f"total {p.get('total')}, activated per token {p.get('activated')}", "", "", ""])
    md.append(table(["model", "stage", "steps", "scenes", "items", "trainable groups", "trainable params", "mean train loss", "last loss"], rows))
    ds = _get(tr, "stages", "align", "deepspeed")
    md.append(f"{tr.get('model', '')}; {dn.get('model', '')}. DeepSpeed: "
              f"{f'training/deepspeed/{ds}' if isinstance(ds, str) else 'off (plain PyTorch through the same Trainer)'}. "
              "Sources: `train/summary.json`, `train_dense/summary.json`, `<stage>/log.jsonl`.\n\n")
    if tr.get("stages"):
        figures["losses"] = str(plot_losses(tr, dn, figs / "training_loss.png").relative_to(out))
        md.append(f"![training loss]({figures['losses']})\n\n")

    # --- routing ------------------------------------------------------------------------------
    rt = _get(ev, "models", "mose", "routing")
    if rt:
        md.append("## Routing per skill (MoSE, held-out hierarchical items)\n\n")
        tir = rt.get("token_identity_router") or {}
        md.append(table(["router", "coarse top-1 in group", "fine top-1 in group", "balance (1 = even)", "labelled tokens (x layers)", "held-out LM loss"],
                        [["MoSE (learned, label-free at inference)", rt.get("coarse_accuracy"), rt.get("fine_accuracy"), rt.get("balance"),
                          rt.get("coarse_tokens"), rt.get("lm_loss")]]
                        + ([["token identity only (reference)", tir.get("coarse_accuracy"), tir.get("fine_accuracy"), None, tir.get("coarse_tokens"), None]]
                           if tir else [])))
        if tir and rt.get("coarse_accuracy") is not None and tir.get("coarse_accuracy") is not None:
            verdict = "beats" if rt["coarse_accuracy"] > tir["coarse_accuracy"] else "does not beat"
            md.append(f"\nThe learned router {verdict} the token-identity reference on coarse skills ({rt['coarse_accuracy']:.4f} vs "
                      f"{tir['coarse_accuracy']:.4f}): the reference is the best router that sees only each token's id (per id, the expert "
                      f"serving most of its {tir.get('train_tokens')} training tokens; mose/routing_eval.py `token_identity_accuracy`).\n")
        per = rt.get("per_skill", {})
        groups = rt.get("skill_groups", {})
        rows = [[("&nbsp;&nbsp;" * depth.get(s, 0)) + s, ", ".join(map(str, groups.get(s, []))), per.get(s)] for s in rt.get("skills", []) if s in per]
        md.append("\n" + table(["skill", "its experts", "top-1 in its group"], rows))
        if rt.get("usage"):
            figures["routing"] = str(plot_routing(rt, depth, figs / "routing_heatmap.png").relative_to(out))
            md.append(f"\n![routing heatmap per skill]({figures['routing']})\n\n")
        md.append("Cells: share of each skill's token choices (top-k, all MoE layers) per expert; the skill's own experts are outlined. "
                  "Source: `evaluate/routing/routing.json` (mose/routing_eval.py `evaluate_routing`, from the routing trace).\n\n")

    # --- results vs dense ---------------------------------------------------------------------
    md.append("## Held-out results: MoSE vs the dense baseline\n\n")
    md.append(f"{fmt(ev.get('heldout_scenes'))} held-out scenes. Both models: same manifests, stages, steps and learning rates.\n\n")
    for m, res in (ev.get("models") or {}).items():  # runs evaluated before the well-formed counts: recomputed from its files
        rec = _get(res, "coda", "offline", "object_recall")
        if isinstance(rec, dict) and "well_formed" not in rec:
            wf = _well_formed_recall(run, _get(res, "coda", "scores"))
            if wf is not None:
                rec["well_formed"] = wf
    md.append("### CODA-style QA (offline metrics)\n\n")
    rows = []
    for m in ("mose", "dense"):
        off = _get(ev, "models", m, "coda", "offline") or {}
        for task in ("general", "region", "suggestion"):
            if task in off:
                o = off[task]
                rows.append([MODEL_NAMES[m], task, o.get("n"), o.get("missing"), o.get("bleu4"), o.get("rouge_l"), o.get("cider_d")])
    md.append(table(["model", "task", "questions", "missing", "BLEU-4 (0-100)", "ROUGE-L (0-1)", "CIDEr-D (0-10)"], rows))
    rows = []
    for m in ("mose", "dense"):
        if m not in ev.get("models", {}):
            continue
        wf = _get(ev, "models", m, "coda", "offline", "object_recall", "well_formed")
        if not wf:
            rows.append([MODEL_NAMES[m], "n/a", "n/a", "n/a", "n/a (not computed)", "n/a (not computed)", "-"])
            continue
        all_bad = bool(wf.get("answers")) and wf.get("degenerate") == wf.get("answers")
        why = ", ".join(f"{k} {v}" for k, v in (wf.get("degenerate_reasons") or {}).items()) or "-"
        rows.append([MODEL_NAMES[m], wf.get("answers"), f"{fmt(wf.get('degenerate'))} of {fmt(wf.get('answers'))}", wf.get("scenes"),
                     DEGENERATE if all_bad else wf.get("recall"), DEGENERATE if all_bad else wf.get("precision"), why])
        numbers[f"object_recall_{m}"] = None if all_bad else wf.get("recall")
    md.append("Object recall / precision of the general-perception answers, over **well-formed answers only** (eval/coda_scores.py "
              "`degenerate_reason`: at least 4 words, 3 of them distinct, distinct words at least 0.3 of all, at most half of the word "
              "4-grams repeating an earlier one). A keyword count rewards degenerate text that happens to contain \"car\"; such "
              "answers are counted here, not scored, and a model whose answers are all degenerate has no number and no bar.\n")
    md.append(table(["model", "general answers", "degenerate answers", "scenes scored", "object recall (well-formed)",
                     "object precision (well-formed)", "degenerate: reason (count)"], rows))
    judge = ev.get("judge")
    if judge:
        rows = []
        for m in ("mose", "dense"):
            js = _get(ev, "models", m, "coda", "judge_scores") or {}
            for task, v in js.items():
                if isinstance(v, dict) and "score" in v:
                    rows.append([MODEL_NAMES[m], task, v.get("score"), v.get("score_failures_as_1"), v.get("judged"), v.get("failed")])
        md.append(f"\nLLM judge {judge.get('model')} at {judge.get('url')}:\n\n")
        md.append(table(["model", "task", "judge score", "failures as 1", "judged", "failed"], rows))
    else:
        md.append("\nLLM judge: not configured (set MOSE_JUDGE_URL and MOSE_JUDGE_MODEL to an OpenAI-compatible endpoint to add it).\n")
    md.append("Source: `evaluate/coda/<model>/scores.json` (`mose eval coda` on the held-out pool).\n\n")

    md.append("### Planned trajectories: EPDMS\n\n")
    decoders = []
    for m, summ in (("mose", tr), ("dense", dn)):
        dec = _get(ev, "models", m, "planning", "decoder")
        refits = [f"{st} ({r['items']} items, {r['steps']} full-batch steps, loss {fmt(r['loss_before'])} -> {fmt(r['loss_after'])})"
                  for st, v in (_get(summ, "stages") or {}).items() if isinstance(r := (v or {}).get("plan_refit"), dict) and "steps" in r]
        if dec:
            decoders.append(f"{MODEL_NAMES[m]}: `{dec}`" + (f", planning head refit after {'; '.join(refits)}" if refits else ""))
    if decoders:
        md.append("Trajectory decoder (mose/trajectory_decoders.py; `head`: a regression head on the prompt's hidden states, residual to "
                  "a constant-velocity prior, its poses written into the answer; `text`: decimals in the answer): "
                  + "; ".join(decoders) + ".\n\n")
    rows = []
    for m in ("mose", "dense"):
        p = _get(ev, "models", m, "planning") or {}
        rows.append([MODEL_NAMES[m], p.get("scenes"), p.get("valid"), p.get("invalid"), p.get("mean_score"), p.get("mean_score_valid"),
                     _get(p, "submetrics_valid_mean", "no_at_fault_collisions"), _get(p, "submetrics_valid_mean", "drivable_area_compliance"),
                     _get(p, "submetrics_valid_mean", "ego_progress")])
        numbers[f"epdms_{m}"] = p.get("mean_score")
    for r, p in (ev.get("references") or {}).items():
        rows.append([REF_NAMES.get(r, r), p.get("scenes"), p.get("valid"), p.get("invalid"), p.get("mean_score"), p.get("mean_score_valid"),
                     _get(p, "submetrics_valid_mean", "no_at_fault_collisions"), _get(p, "submetrics_valid_mean", "drivable_area_compliance"),
                     _get(p, "submetrics_valid_mean", "ego_progress")])
    md.append(table(["planner", "scenes", "valid", "invalid", "EPDMS (invalid = 0)", "EPDMS over valid", "NC", "DAC", "EP"], rows))
    rows = []
    for m in ("mose", "dense"):
        f = _get(ev, "models", m, "planning", "format") or {}
        reasons = _get(ev, "models", m, "planning", "invalid_reasons") or {}
        rows.append([MODEL_NAMES[m], f.get("answers"), f.get("format_ok"), f.get("trajectory_complete"), f.get("mean_trajectory_points"),
                     "; ".join(f"{k} ({v})" for k, v in reasons.items()) or "-"])
    md.append("\n" + table(["model", "answers", "well-formed (no parser error)", "complete 8-pose trajectories", "mean poses read", "invalid rows: reason (count)"], rows))
    said = []
    for m in ("mose", "dense"):
        f = _get(ev, "models", m, "planning", "format") or {}
        said.append(f"{MODEL_NAMES[m]} wrote a complete trajectory for {fmt(f.get('trajectory_complete'))} of {fmt(f.get('answers'))} held-out scenes")
    md.append("In this run: " + "; ".join(said) + ". ")
    md.append("A model answer without a complete 8-pose trajectory is an invalid row (score 0, reason kept in the CSV), never dropped. "
              "Sources: `evaluate/results.json`, `evaluate/planning/<model>/epdms_scores.csv` (per scene), `.../answers.jsonl` (raw answers).\n\n")
    sample = _first_answer(run / "evaluate" / "planning" / "mose" / "answers.jsonl")
    if sample is not None:
        md.append("First held-out answer of MoSE (verbatim, first 300 characters):\n\n```\n" + sample[:300].replace("```", "'''") + "\n```\n\n")

    # --- closed loop --------------------------------------------------------------------------
    md.append("## Closed loop (highway-env)\n\n")
    cl_means = closed_loop_means(run, cl)
    rows = []
    for rank, name in enumerate(rank_planners(cl_means), 1):
        mm = cl_means[name]
        rank = str(rank) if _num(mm.get("epdms")) is not None else "-"
        d = (cl.get("planners") or {}).get(name, {}).get("decisions", {})
        rows.append([rank, display_name(name), mm.get("episodes"), mm.get("epdms"), f"{fmt(mm.get('crashes'))} of {fmt(mm.get('episodes'))}",
                     mm.get("epdms_unscored"), mm.get("crash_rate"), mm.get("offroad_rate"), mm.get("route_completion"), mm.get("progress_m"),
                     mm.get("comfort"), mm.get("planner_failures"), f"{d.get('trajectory_parsed')}/{d.get('model_calls')}" if d else "-"])
        numbers[f"closed_loop_{name}_route_completion"] = mm.get("route_completion")
        numbers[f"closed_loop_{name}_epdms"] = mm.get("epdms")
    md.append(table(["rank", "planner", "episodes", "EPDMS (executed, crash = 0)", "crashed episodes", "unscored episodes", "crash rate",
                     "offroad rate", "route completion", "progress (m)", "comfort", "planner failures", "model answers with a trajectory"], rows))
    md.append(f"Planners ranked by EPDMS of the executed drive, mean over episodes: a crashed episode scores 0 and is never skipped "
              f"(eval/closed_loop.py `episode_score`, recomputed here from the episodes in `closed_loop/<planner>.json`); an episode "
              f"without a crash that is too short for a scored scene (under 5.5 s) is unscored, left out of the mean and counted. "
              f"Environments {', '.join(cl.get('envs', []))}, {fmt(cl.get('episodes'))} episode(s) of {fmt(cl.get('duration_s'), 1)} s per planner, same seeds "
              f"for every planner; a decision every 0.5 s. The models are asked every {fmt(_replan(cl))} decision(s) and follow the rest "
              "of their last plan in between. A decision without a readable trajectory is a planner failure: the ego brakes (eval/closed_loop.py). "
              "The models' image is drawn from the observation's lanes and agents (closed-loop observations carry no render), "
              "which approximates the simulator renders they were trained on. Source: `closed_loop/results.json`, `closed_loop/<planner>.json`.\n\n")
    if ev.get("models"):
        figures["scores"] = str(plot_scores(ev, cl_means, figs / "scores_vs_dense.png").relative_to(out))
        md.append(f"![scores vs the dense baseline]({figures['scores']})\n\n")

    write_text(out / "report.md", "".join(md))
    return {"report": str((out / "report.md").relative_to(run)), "figures": figures, "numbers": numbers}


def mosaic_gain(ms: dict) -> tuple[dict | None, str]:
    """(curation/scaling.py `bounded_gain` of a MOSAIC stage state, the note on U₀). States written before the bound
    existed carry only the raw sum as "predicted_gain": it is bounded here by the demo pilot's range (eval/pilot.py
    `FastPilot.score_bounds`)."""
    from curation.mosaic import base_score_note
    from curation.scaling import bounded_gain
    from eval.pilot import FastPilot

    pilot = ms.get("pilot") or {}
    raw = ms.get("predicted_gain_raw", ms.get("predicted_gain"))
    bounds = ms["score_bounds"] if "score_bounds" in ms else FastPilot.score_bounds
    gain = None if raw is None else bounded_gain(raw, pilot.get("base_score"), bounds)
    note = pilot["base_note"] if "base_note" in pilot else base_score_note(pilot.get("base_size", 0), pilot.get("base_score"),
                                                                            pilot.get("base_valid_fraction"))
    return gain, note


def closed_loop_means(run: Path, cl: dict) -> dict:
    """planner -> closed-loop means, recomputed from the episodes of its `closed_loop/<planner>.json` (eval/closed_loop.py
    `episode_means`: a crash scores 0, whatever the file's older means said); the step's means where that file is missing."""
    from eval.closed_loop import episode_means

    out = {}
    for name, p in (cl.get("planners") or {}).items():
        path = Path(run) / p["file"] if p.get("file") else None
        episodes = _load(path).get("episodes") if path is not None else None
        out[name] = episode_means(episodes) if episodes else dict(p.get("means") or {})
    return out


def _well_formed_recall(run: Path, scores_rel: str | None) -> dict | None:
    """eval/coda_scores.py `object_recall(...)["well_formed"]` from the questions and predictions next to a model's
    scores.json (for runs evaluated before that block existed); None if the files are not there."""
    from eval.coda_scores import object_recall

    if not scores_rel:
        return None
    folder = (Path(run) / scores_rel).parent
    files = [folder / "questions.jsonl", folder / "predictions.jsonl"]
    if not all(f.is_file() for f in files):
        return None
    read = lambda f: [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]  # noqa: E731
    questions = [q for q in read(files[0]) if q.get("task") == "general"]
    predictions = {p["question_id"]: p.get("answer", "") for p in read(files[1])}
    return object_recall(questions, predictions)["well_formed"]


def rank_planners(cl_means: dict) -> list[str]:
    """Planners by closed-loop EPDMS (crash = 0), best first; unscored planners last; equal scores keep the config order."""
    def key(name):
        v = _num(cl_means[name].get("epdms"))
        return (v is None, -(v or 0.0))

    return sorted(cl_means, key=key)


def _replan(cl: dict):
    return next((p["decisions"].get("replan_every") for p in (cl.get("planners") or {}).values() if p.get("decisions")), None)


def _first_answer(path: Path) -> str | None:
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            return json.loads(line)["answer"]
        except (ValueError, KeyError):
            continue
    return None


__all__ = ["build_report", "closed_loop_means", "fmt", "object_recall_value", "planner_color", "rank_planners", "scores_figure", "losses_figure", "table", "stage_coverage"]
