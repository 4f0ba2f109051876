"""ScenePool rows -> items of the hierarchical skill dataset (plain dicts; tokenised by mose/skill_data.py).

Per scene:
- one "hierarchical" item: a single-turn question asking for the three steps, and the tagged answer of
  `mose.skill_format` built from `skill_annotation.hierarchical_segments` (QA answers + templated text);
- one "single" item per QA item with a question and an answer (CODA-LM-style general / region / suggestion /
  trajectory tasks): the answer labelled with the QA's skills sentence by sentence (`segment_text`).

An item is ``{item_id, scene_id, kind, task, prompt, target, spans: [{start, end, skill}], images: [path],
box: [x, y, w, h] (pixels, region items) , skills: [fine skills in the item]}``. Spans cover the target's
characters (single items: each sentence with its whitespace). Images are the current frame's, resolved under
the pool root (at most `max_images`, first camera first).

Skipped and counted in `ItemReport` (never silently): QA items without a question (CODA's per-object
annotations), without an answer, or whose skills do not resolve; scenes with an empty hierarchical target.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets_cfg.schema import Scene, ScenePool
from datasets_cfg.skill_annotation import AnnotationReport, hierarchical_segments, qa_skills, qa_spans
from mose.skill_format import NUM_POSES, POSE_INTERVAL_S, TRAJECTORY_SKILL, format_trajectory, parse_trajectory, render_target
from mose.skills import Taxonomy

COMMAND_TEXT = {"left": "turn or change lanes to the left", "right": "turn or change lanes to the right",
                "straight": "go straight", "unknown": "none given"}


def hierarchical_prompt(row: dict, taxonomy: Taxonomy) -> str:
    """The question of the step-by-step item (our wording): context the answer needs, and the format."""
    steps = ", ".join(f"<{r}>" for r in taxonomy.roots)
    ctx = [f"Driving command: {COMMAND_TEXT.get(row['command'], row['command'])}."]
    if row["ego"]["speed"]:
        ctx.append(f"Ego speed: {row['ego']['speed'][row['current_index']]:.1f} m/s.")
    return (
        "You are driving the ego car in this scene. " + " ".join(ctx) + f" Think step by step in one answer: {steps}, "
        "each in its own tag, one line per skill as [skill] text. End the planning step with [trajectory] and "
        f"{NUM_POSES} future poses (x, y) in metres, {POSE_INTERVAL_S} s apart, in the ego frame (x forward, y left)."
    )


@dataclass
class ItemReport:
    items: Counter = field(default_factory=Counter)  # "kind/task" -> count
    skips: list = field(default_factory=list)  # (reason, id) of everything left out
    annotation: AnnotationReport = field(default_factory=AnnotationReport)

    def skip(self, reason: str, ident: str) -> None:
        self.skips.append((reason, ident))

    def as_dict(self) -> dict:
        examples: dict[str, list] = {}
        for reason, ident in self.skips:
            examples.setdefault(reason, [])
            if len(examples[reason]) < 5:
                examples[reason].append(ident)
        return {"items": dict(self.items), "skipped": dict(Counter(r for r, _ in self.skips)), "skipped_examples": examples,
                "unknown_skill_names": dict(self.annotation.unknown_skills)}


def _images(row: dict, root: Path | None, max_images: int) -> list[str]:
    scene = Scene(row, root)
    paths = scene.image_paths(frame=scene.current_index) or scene.image_paths()[-1:]
    return [str(p) for p in paths[:max_images]]


def scene_items(row: dict, taxonomy: Taxonomy, *, root: str | Path | None = None, max_images: int = 1,
                kinds: tuple[str, ...] = ("hierarchical", "single"), on_unknown: str = "count",
                report: ItemReport | None = None) -> list[dict]:
    """The items of one scene (see the module doc). `on_unknown="raise"` turns an unknown skill into an error."""
    tax = taxonomy
    rep = report if report is not None else ItemReport()
    images = _images(row, Path(root) if root else None, max_images)
    out = []
    if "hierarchical" in kinds:
        # single items read the same QA: count their unknown skill names once, there
        hier_rep = rep.annotation if "single" not in kinds else AnnotationReport()
        target, spans = render_target(hierarchical_segments(row, tax, hier_rep, on_unknown=on_unknown), tax)
        if target:
            out.append(_item(f"{row['id']}:hierarchical", row["id"], "hierarchical", "hierarchical", hierarchical_prompt(row, tax),
                             target, [(s.start, s.end, s.skill) for s in spans], images, [], tax))
        else:
            rep.skip("empty hierarchical target", row["id"])
    if "single" in kinds:
        for j, q in enumerate(row["qa"]):
            ident = q["qid"]
            if not q["question"].strip():
                rep.skip("qa without a question", ident)
                continue
            if not q["answer"].strip():
                rep.skip("qa without an answer", ident)
                continue
            skills = qa_skills(q, tax, where=f"scene {row['id']} qa[{j}]", on_unknown=on_unknown, report=rep.annotation)
            if not skills:
                rep.skip("qa without a skill", ident)
                continue
            target = q["answer"].strip()
            if TRAJECTORY_SKILL in skills:
                xy, _, errors = parse_trajectory(target)
                if xy is None or errors:
                    rep.skip("trajectory answer does not parse", ident)
                    continue
                target = format_trajectory(xy)  # one machine-readable form for every source
                spans = [(0, len(target), TRAJECTORY_SKILL)]
            else:
                spans = qa_spans(q, tax, skills)
            out.append(_item(ident, row["id"], "single", q["task"], q["question"].strip(), target, spans, images, list(q["box"]), tax))
    for it in out:
        rep.items[f"{it['kind']}/{it['task']}"] += 1
    return out


def _item(item_id, scene_id, kind, task, prompt, target, spans, images, box, tax) -> dict:
    skills = [n for n in tax.names if n in {s for _, _, s in spans}]
    return {"item_id": item_id, "scene_id": scene_id, "kind": kind, "task": task, "prompt": prompt, "target": target,
            "spans": [{"start": int(a), "end": int(b), "skill": s} for a, b, s in spans], "images": images,
            "box": [float(b) for b in box], "skills": skills}


def pool_items(pool: ScenePool, taxonomy: Taxonomy, *, max_images: int = 1,
               kinds: tuple[str, ...] = ("hierarchical", "single"), on_unknown: str = "count", num_proc: int | None = None):
    """All items of a pool as a `datasets.Dataset` (built with `map` in memory: cheap, and always current), and an ItemReport.

    Skips travel through the map as rows of kind "skipped" (task = reason), counted and then filtered out.
    """
    tax = taxonomy
    root = pool.root

    def explode(batch: dict) -> dict:
        rep = ItemReport()
        items = []
        for vals in zip(*batch.values()):
            items += scene_items(dict(zip(batch, vals)), tax, root=root, max_images=max_images, kinds=kinds,
                                 on_unknown=on_unknown, report=rep)
        for name, n in rep.annotation.unknown_skills.items():
            rep.skips += [(f"unknown skill name {name!r} (dropped)", "")] * n
        items += [dict(_EMPTY, item_id=ident, kind="skipped", task=reason) for reason, ident in rep.skips]
        return {k: [it[k] for it in items] for k in ITEM_COLUMNS}

    # in memory: never reuse a stale cache after the annotation code changed, never write into the pool directory
    ds = pool.dataset.map(explode, batched=True, batch_size=64, remove_columns=pool.dataset.column_names,
                          num_proc=num_proc, keep_in_memory=True, desc="building skill items")
    report = ItemReport()
    kinds_col, tasks_col, ids_col = ds["kind"], ds["task"], ds["item_id"]
    for kind, task, ident in zip(kinds_col, tasks_col, ids_col):
        if kind == "skipped":
            report.skip(task, ident)
        else:
            report.items[f"{kind}/{task}"] += 1
    keep = [i for i, k in enumerate(kinds_col) if k != "skipped"]
    return ds.select(keep), report


ITEM_COLUMNS = ("item_id", "scene_id", "kind", "task", "prompt", "target", "spans", "images", "box", "skills")
_EMPTY = {"item_id": "", "scene_id": "", "kind": "", "task": "", "prompt": "", "target": "", "spans": [], "images": [], "box": [], "skills": []}
