"""The coverage report of a per-stage data plan (curation/plan.py): scenes per skill x source x environment,
selected and available in each stage pool, as coverage.csv (long table), coverage.md and coverage.png."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from curation.plan_reserve import StageCandidates
from curation.plan_spec import DataPlan
from curation.selection import Selection


def coverage_rows(plan: DataPlan, data: dict[str, StageCandidates], selections: dict[str, Selection]) -> list[dict]:
    """Long table: one row per (stage, skill, source, environment) with selected scenes and the stage pool's
    available scenes. Stage "<pool>" rows count each stage pool's candidates once per distinct pool set."""
    tax = plan.skill_tree
    rows = []
    for name, sel in selections.items():
        d = data[name]
        pos = {s: i for i, s in enumerate(d.ids)}
        chosen = [pos[i] for i in sel.ids if i in pos]
        avail = Counter((s, str(d.sources[i]), str(d.locations[i]) or "<unknown>") for i in range(len(d.ids)) for s in d.skills[i])
        got = Counter((s, str(d.sources[i]), str(d.locations[i]) or "<unknown>") for i in chosen for s in d.skills[i])
        envs = sorted({(str(d.sources[i]), str(d.locations[i]) or "<unknown>") for i in range(len(d.ids))})
        for s in tax.names:
            for src, env in envs:
                rows.append({"stage": name, "skill": s, "source": src, "environment": env,
                             "selected": got.get((s, src, env), 0), "available": avail.get((s, src, env), 0)})
    return rows


def write_coverage(rows: list[dict], out: Path, stages: list[str], targets: dict[str, dict] | None = None) -> tuple[Path, Path, Path]:
    """coverage.csv (long), coverage.md (per stage: skills x source/environment, selected of available, then the
    soft targets: target / achieved / reachable / greedy scenes, from `targets` {stage: state["skills"]["target"]})
    and coverage.png (one heatmap per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import save_figure, write_text

    lines = ["stage,skill,source,environment,selected,available"]
    lines += [f"{r['stage']},{r['skill']},{r['source']},{r['environment']},{r['selected']},{r['available']}" for r in rows]
    csv = out / "coverage.csv"
    write_text(csv, "\n".join(lines) + "\n")
    md_parts = ["# Coverage: scenes per skill (selected / available in the stage pool)\n"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        sr = [r for r in rows if r["stage"] == stage]
        skills = list(dict.fromkeys(r["skill"] for r in sr))
        cols = list(dict.fromkeys(f"{r['source']}/{r['environment']}" for r in sr))
        M = np.zeros((len(skills), len(cols)), int)
        A = np.zeros_like(M)
        for r in sr:
            i, j = skills.index(r["skill"]), cols.index(f"{r['source']}/{r['environment']}")
            M[i, j], A[i, j] = r["selected"], r["available"]
        md_parts.append(f"\n## {stage}\n\n| skill | " + " | ".join(cols) + " | total |\n|" + "---|" * (len(cols) + 2) + "\n")
        for i, s in enumerate(skills):
            md_parts.append(f"| {s} | " + " | ".join(f"{M[i, j]}/{A[i, j]}" for j in range(len(cols))) + f" | {M[i].sum()} |\n")
        tg = (targets or {}).get(stage) or {}
        if tg:
            md_parts.append("\nSoft targets (scenes; reachable = the most any selection within the budget, quotas and minimums meets, "
                            "for that target alone; greedy = the swap repair before the target program):\n\n"
                            "| skill | target | achieved | reachable | greedy |\n|---|---|---|---|---|\n")
            for s, v in tg.items():
                md_parts.append(f"| {s} | {v['target']} | {v['achieved']} | {v['reachable']} | {v['greedy']} |\n")
        im = ax.imshow(M, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=70, fontsize=6)
        ax.set_yticks(range(len(skills)))
        ax.set_yticklabels(skills, fontsize=6)
        ax.set_title(f"{stage}: selected scenes", fontsize=9)
        for i in range(len(skills)):
            for j in range(len(cols)):
                if M[i, j]:
                    ax.text(j, i, str(M[i, j]), ha="center", va="center", fontsize=5, color="white" if M[i, j] < M.max() / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    md = out / "coverage.md"
    write_text(md, "".join(md_parts))
    return csv, md, save_figure(fig, out / "coverage.png")
