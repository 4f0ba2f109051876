"""The data-efficiency summary: mean ± std per budget, BRMR per method, the markdown table and the plot.

BRMR here (issue 11, the paper's "budget relative to manual random"): the budget a method needs to reach random's
mean score at the largest budget B_max, divided by B_max (the budget random used for that score), so random = 1 by
definition. "Needed budget" = where the method's mean-over-seeds curve, made monotone by a running maximum, first
reaches the target, interpolated linearly in log(budget) between the two budgets that bracket it:
`curation.scaling.brmr` with the method's curve as the reference curve. Bounds: a method that never reaches the
target needs more than its largest budget ("more_than"); one already at or above it at its smallest budget needs
at most that ("at_most"). Random's own crossing is reported too: when it is far below B_max, random's curve is
flat and every BRMR is small for that reason. The paper-style per-budget BRMR (each
budget's score, the budget random needs for it) is `curation.scaling.brmr` as it is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from curation.scaling import brmr


def stats(values) -> dict:
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v), "values": v}


def needed_budget(budgets, scores, target: float, interpolation: str = "log") -> dict:
    """{"budget", "bound"}: the budget at which the curve (budgets, scores) first reaches `target`."""
    r = brmr([1.0], [target], budgets, scores, interpolation)[0]
    if r["bound"] == "upper":
        return {"budget": None, "bound": "more_than", "limit": float(max(budgets))}
    if r["bound"] == "lower":
        return {"budget": float(r["random_budget"]), "bound": "at_most"}
    return {"budget": float(r["random_budget"]), "bound": None}


def brmr_row(needed: dict, random_budget: float) -> dict:
    """BRMR = needed / random's budget; a bound stays a bound ("more_than": BRMR > value, "at_most": BRMR <= value)."""
    if needed["bound"] == "more_than":
        return {"brmr": needed["limit"] / random_budget, "bound": "more_than"}
    return {"brmr": needed["budget"] / random_budget, "bound": needed["bound"]}


def summarise(scores: dict[str, dict[int, list[float]]], interpolation: str = "log", bootstrap: int = 500,
              random_state: int = 0) -> dict:
    """`scores[method][budget]` = per-seed test scores. Returns per method: per-budget stats, needed budget, BRMR
    (with a bootstrap interval over seeds), and the paper-style per-budget BRMR. Needs a "random" entry."""
    if "random" not in scores:
        raise ValueError("summarise: the BRMR reference method 'random' has no scores")
    rb = sorted(scores["random"])
    r_mean = [float(np.mean(scores["random"][b])) for b in rb]
    target = r_mean[-1]
    r_need = needed_budget(rb, r_mean, target, interpolation)["budget"]
    out = {"target": {"method": "random", "budget": rb[-1], "score": target, "random_needed_budget": r_need}, "methods": {}}
    rng = np.random.default_rng(random_state)
    for m, per in scores.items():
        bs = sorted(per)
        means = [float(np.mean(per[b])) for b in bs]
        need = needed_budget(bs, means, target, interpolation)
        # random against itself is 1 by definition, even when its own needed budget is only bounded
        row = {"budgets": {str(b): stats(per[b]) for b in bs}, "needed": need,
               **({"brmr": 1.0, "bound": None} if m == "random" else brmr_row(need, rb[-1]))}
        row["per_budget_brmr"] = brmr(bs, means, rb, r_mean, interpolation)
        if bootstrap and min(len(per[b]) for b in bs) > 1:
            draws = []
            for _ in range(bootstrap):  # resample seeds of the method and of random independently
                rs = [float(np.mean(rng.choice(scores["random"][b], len(scores["random"][b])))) for b in rb]
                ms = rs if m == "random" else [float(np.mean(rng.choice(per[b], len(per[b])))) for b in bs]
                nd = needed_budget(bs, ms, rs[-1], interpolation)
                draws.append(1.0 if m == "random" else brmr_row(nd, rb[-1])["brmr"])
            row["brmr_bootstrap_90"] = [float(np.quantile(draws, 0.05)), float(np.quantile(draws, 0.95))]
        out["methods"][m] = row
    return out


def fmt_brmr(row: dict) -> str:
    v = row["brmr"]
    s = f"{v:.2f}"
    if row["bound"] == "more_than":
        s = f"> {s}"
    elif row["bound"] == "at_most":
        s = f"≤ {s}"
    return s


def fmt_needed(need: dict) -> str:
    if need["bound"] == "more_than":
        return f"> {need['limit']:.0f}"
    return ("≤ " if need["bound"] == "at_most" else "") + f"{need['budget']:.0f}"


def table_markdown(summary: dict, order: list[str], full_score: dict | None = None, composition: dict | None = None) -> str:
    """Markdown: one row per method, mean ± std per budget, the budget needed to reach the target, BRMR (and its
    bootstrap interval); then, with `composition`, the synthetic share of each method's selections."""
    budgets = sorted({int(b) for m in order for b in summary["methods"][m]["budgets"]})
    head = "| method | " + " | ".join(f"B = {b}" for b in budgets) + " | needed | BRMR ↓ | 90 % interval |"
    lines = [head, "|" + "---|" * (len(budgets) + 4)]
    for m in order:
        row = summary["methods"][m]
        cells = []
        for b in budgets:
            s = row["budgets"].get(str(b))
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s else "–")
        ci = row.get("brmr_bootstrap_90")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt_needed(row['needed'])} | {fmt_brmr(row)} | "
                     + (f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "–") + " |")
    t = summary["target"]
    lines.append("")
    lines.append(f"EPDMS of the fast pilot on the fixed test set, mean ± std over seeds. needed = training scenes a method needs "
                 f"to reach random's mean at B = {t['budget']} ({t['score']:.4f}) (running maximum of its mean curve, "
                 f"log-interpolated); BRMR = needed / {t['budget']} (random's budget for that score; the paper's definition); '> x': "
                 f"not reached within the largest budget, '≤ x': reached at the smallest. 90 % interval: bootstrap over seeds. "
                 f"Random's own mean curve first reaches that score at {t['random_needed_budget']:.0f} scenes"
                 + (": its curve is flat beyond that, which makes every BRMR here small." if t["random_needed_budget"] < 0.5 * t["budget"] else "."))
    if full_score:
        real = (f"its real scenes alone ({full_score['real_n']}) {full_score['real_score']:.4f}; "
                if full_score.get("real_score") is not None else "")
        lines.append(f"Reference: the whole training pool ({full_score['n']} scenes) scores {full_score['score']:.4f}; {real}"
                     f"the untrained constant-speed/yaw-rate rollout scores {full_score['rollout']:.4f}.")
    if composition:
        lines += ["", "Synthetic share of the selected scenes (mean over seeds):", "",
                  "| method | " + " | ".join(f"B = {b}" for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
        for m in order:
            lines.append(f"| {m} | " + " | ".join(f"{composition[m][str(b)]['synthetic_fraction']:.2f}" for b in budgets) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, order: list[str], path, title: str = "", references: dict | None = None) -> Path:
    """PNG: score vs budget (log x) with ±std bands per method, random's target line and `references` (name -> score,
    grey dotted lines); BRMR per method with its bootstrap interval (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import save_figure

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.7, 1]})
    cmap = plt.get_cmap("tab10")
    for k, m in enumerate(order):
        row = summary["methods"][m]
        bs = sorted(int(b) for b in row["budgets"])
        mu = np.array([row["budgets"][str(b)]["mean"] for b in bs])
        sd = np.array([row["budgets"][str(b)]["std"] for b in bs])
        style = dict(color="black", lw=2.2) if m == "random" else dict(color=cmap(k % 10), lw=1.6)
        a1.plot(bs, mu, "o-", label=m, ms=4, **style)
        a1.fill_between(bs, mu - sd, mu + sd, alpha=0.12, color=style["color"])
    t = summary["target"]
    a1.axhline(t["score"], color="black", ls="--", lw=0.8)
    x0 = min(int(b) for b in summary["methods"]["random"]["budgets"])
    a1.text(x0, t["score"], f" random @ {t['budget']}", va="bottom", fontsize=7)
    x1 = max(int(b) for m in order for b in summary["methods"][m]["budgets"])
    for k, (name, score) in enumerate((references or {}).items()):
        a1.axhline(score, color="0.5", ls=":", lw=1.0)
        a1.text(x1, score, f"{name} ", va="bottom" if k % 2 == 0 else "top", ha="right", fontsize=7, color="0.35")
    a1.set_xscale("log")
    ticks = sorted({int(b) for m in order for b in summary["methods"][m]["budgets"]})
    a1.set_xticks(ticks, [str(b) for b in ticks])
    a1.minorticks_off()
    a1.set_xlabel("budget (training scenes)")
    a1.set_ylabel("EPDMS on the fixed test set")
    a1.set_title(title or "score vs budget (mean ± std over seeds)", fontsize=10)
    a1.legend(fontsize=7, ncol=2)
    # BRMR: a dot per method (triangle up: more than the value, down: at most), bootstrap interval as a line
    for k, m in enumerate(order):
        row = summary["methods"][m]
        color = "black" if m == "random" else cmap(k % 10)
        marker = {"more_than": "^", "at_most": "v"}.get(row["bound"], "o")
        a2.scatter([k], [row["brmr"]], color=color, marker=marker, s=45, zorder=3)
        ci = row.get("brmr_bootstrap_90")
        if ci:
            a2.plot([k, k], ci, color=color, lw=1.2, alpha=0.7)
        a2.annotate(fmt_brmr(row), (k, row["brmr"]), textcoords="offset points", xytext=(6, 0), fontsize=7, va="center")
    a2.axhline(1.0, color="black", lw=0.8)
    a2.axhline(0.5, color="tab:red", lw=0.8, ls=":")
    a2.set_yscale("log")
    a2.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    a2.set_xlim(-0.5, len(order) - 0.2)
    a2.set_ylabel("BRMR (log scale, lower is better)")
    a2.set_title(f"budget to reach random's score at B = {t['budget']}, relative to random\n(dotted: the 0.5 goal; lines: 90 % bootstrap)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
