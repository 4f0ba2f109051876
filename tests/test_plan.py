"""The per-stage data plan (curation/plan.py, pipelines/curate_plan.py): bad plans fail early and clearly; a plan
end to end writes manifests that respect budget, ratio and skill minimums, plus the coverage report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from curation.plan import PlanError, load_plan, run_plan
from curation.selection import Selection
from datasets_cfg.schema import ScenePool
from mose.skills import load_taxonomy
from pipelines.curate_plan import main as plan_main
from tests.semantic_autoscale_fixtures import mixed_rows, scene

DEMO = Path(__file__).resolve().parents[1] / "datasets_cfg" / "stages" / "demo.yaml"


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """40 scenes (20 real, 20 synthetic; highway / merge) with skills, plus 4 rows without skills (fallback) and
    3 rare 'traffic_cones' scenes."""
    rows = mixed_rows(40)
    rows += [scene(f"bare{i}", agents=[("c", 20.0, 0.0, 5.0, 0.0)], source=["real", "synthetic"][i % 2]) for i in range(4)]
    rows += [scene(f"cone{i}", source="real", location="merge", skills=["traffic_cones"]) for i in range(3)]
    out = tmp_path_factory.mktemp("planpool") / "pool"
    ScenePool.from_rows(rows).save(out)
    return out


def write_plan(tmp_path: Path, pool_dir: Path, stages: dict, **top) -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "seed": 0, "pools": {"sim": {"path": str(pool_dir)}}, "stages": stages, **top}))
    return p


GOOD = {
    "align": {"pools": ["sim"], "method": "random", "budget": 12, "real_fraction": 0.5,
              "skills": {"min": {"interaction_risk": 6, "traffic_cones": 3}}},
    "router_pretrain": {"pools": ["sim"], "method": "coreset", "budget": 10, "ratio": "1:1", "exclude_stages": ["align"],
                        "skills": {"min": {"lateral_control": 5}, "target": {"interaction_risk": 0.5}}},
    "skill_tune": {"pools": ["sim"], "method": "semantic", "params": {"epochs": 2, "mc_samples": 3}, "budget": 8,
                   "real_fraction": 0.5, "filter": {"location": ["highway", "merge"]}},
}


def skills_with_parents(pool: ScenePool) -> dict:
    from datasets_cfg.skill_annotation import scene_skills

    tax = load_taxonomy()
    out = {}
    for s in pool:
        names = list(s["skills"]) or scene_skills(s.row, tax)
        full = set()
        for n in names:
            while n is not None:
                full.add(n)
                n = tax.parent(n)
        out[s.id] = full
    return out


def test_plan_end_to_end(pool_dir, tmp_path):
    plan = load_plan(write_plan(tmp_path, pool_dir, GOOD))
    res = run_plan(plan, tmp_path / "out")
    pool = ScenePool.load(pool_dir)
    src = dict(zip(pool.ids, pool.column("source")))
    sk = skills_with_parents(pool)
    for name, cfg in GOOD.items():
        sel = Selection.read(res.manifests[name])
        assert len(sel) == cfg["budget"] == len(set(sel.ids))
        n_real = sum(src[i] == "real" for i in sel.ids)
        frac = cfg.get("real_fraction", 0.5)
        assert n_real == round(frac * cfg["budget"]) and sel.state["ratio"] == f"{n_real}:{cfg['budget'] - n_real}"
        for skill, m in cfg.get("skills", {}).get("min", {}).items():
            assert sum(skill in sk[i] for i in sel.ids) >= m, (name, skill)
            assert sel.state["skills"]["min"][skill]["selected"] >= m
        assert sel.method == cfg["method"] and sel.state["plan"]["stage"] == name
    align = Selection.read(res.manifests["align"])
    assert {f"cone{i}" for i in range(3)} <= set(align.ids)  # all three rare scenes were needed
    swapped = [r for r, g in zip(align.reasons, align.extra["group"]) if g == "skill_repair"]
    assert len(swapped) == len(align.state["skill_swaps"]) > 0 and all("swapped in for skill" in r for r in swapped)
    assert not set(align.ids) & set(Selection.read(res.manifests["router_pretrain"]).ids)  # exclude_stages
    rp = Selection.read(res.manifests["router_pretrain"])
    assert sum("interaction_risk" in sk[i] for i in rp.ids) >= 5  # soft target 0.5 * 10 met (the pool has enough)
    assert any(f["what"] == "skills_fallback" for f in align.fallbacks)  # the four rows without skills
    # coverage: CSV rows add up to the manifests, markdown and PNG exist
    lines = res.coverage_csv.read_text().splitlines()
    assert lines[0] == "stage,skill,source,environment,selected,available"
    rows = [dict(zip(lines[0].split(","), ln.split(","))) for ln in lines[1:]]
    for name in GOOD:
        sel = Selection.read(res.manifests[name])
        for skill in ("vehicles", "interaction_risk", "traffic_cones"):
            got = sum(int(r["selected"]) for r in rows if r["stage"] == name and r["skill"] == skill)
            assert got == sum(skill in sk[i] for i in sel.ids), (name, skill)
    assert "## align" in res.coverage_md.read_text() and res.coverage_png.stat().st_size > 2000
    summary = json.loads(res.summary.read_text())
    assert set(summary["stages"]) == set(GOOD) and summary["stages"]["align"]["ratio"] == "6:6"


def test_autoscale_stage_with_fake_feedback(pool_dir, tmp_path):
    stages = {"skill_tune": {"pools": ["sim"], "method": "autoscale", "budget": 12,
                             "params": {"n_clusters": 2, "rae_epochs": 2, "max_rounds": 3, "step_size": 1.0},
                             "feedback": {"factory": "fake", "target": 0.0},
                             "skills": {"min": {"traffic_cones": 2}}}}
    from pipelines.curate_hooks import feedback_factory
    from tests.semantic_autoscale_fixtures import FakeRatioFeedback

    def fake_hooks(spec, pool):
        return feedback_factory(spec, pool, hooks={"fake": FakeRatioFeedback})

    res = run_plan(load_plan(write_plan(tmp_path, pool_dir, stages)), tmp_path / "out", feedback_factory=fake_hooks)
    sel = res.selections["skill_tune"]
    assert len(sel) == 12 and sum(i.startswith("cone") for i in sel.ids) >= 2
    st = sel.state["method_state"]["all"]
    assert st["rounds"][0]["ratio"] and st["best_score"] >= st["initial_score"]
    assert (tmp_path / "out" / "skill_tune_report" / "autoscale_rounds.png").is_file()


def test_feedback_factory_module_attr_is_refused(pool_dir, tmp_path, monkeypatch):
    """A plan's feedback.factory names a known hook; "module:attr" is neither imported nor called."""
    import os

    from pipelines.curate_hooks import feedback_factory

    real, calls = os.getcwd, []

    def getcwd(*a, **k):  # the factory would call getcwd(pool, **kw); path code calls getcwd()
        if a or k:
            calls.append((a, k))
            raise AssertionError("the plan ran os.getcwd")
        return real()

    monkeypatch.setattr(os, "getcwd", getcwd)
    stages = {"skill_tune": {"pools": ["sim"], "method": "autoscale", "budget": 12, "feedback": {"factory": "os:getcwd"}}}
    path = write_plan(tmp_path, pool_dir, stages)
    with pytest.raises(PlanError, match=r"stages.skill_tune.feedback: .*unknown feedback hook 'os:getcwd'; expected one of \['closed_loop'\]"):
        run_plan(load_plan(path), tmp_path / "out", feedback_factory=feedback_factory)
    assert not calls and not (tmp_path / "out").exists()


def stage(**kw):
    base = {"pools": ["sim"], "method": "random", "budget": 10}
    base.update(kw)
    return base


BAD = [
    ({"pretrain": stage()}, "stages.pretrain: unknown stage 'pretrain'"),
    ({"align": stage(method="magic")}, "stages.align.method: unknown method 'magic'"),
    ({"align": stage(pools=["nuscenes"])}, r"stages.align.pools: unknown pool\(s\) \['nuscenes'\]"),
    ({"align": stage(budget=0)}, "stages.align.budget: expected a positive integer"),
    ({"align": stage(budget=5, skills={"min": {"vehicles": 6}})}, r"stages.align.skills.min.vehicles: minimum 6 exceeds the stage budget 5"),
    ({"align": stage(budget=4, skills={"min": {"traffic_cones": 3, "interaction_risk": 2}})},
     r"stages.align.skills.min.interaction_risk: the skill minimums need more than the budget of 4"),
    ({"align": stage(skills={"min": {"traffic_cones": 4}})}, r"stages.align.skills.min.traffic_cones: minimum 4 scenes .* cannot be met: the stage pool has 3"),
    ({"align": stage(budget=12, real_fraction=0.75, skills={"min": {"interaction_risk": 6}})},  # only 5 fit the quotas
     r"stages.align.skills.min.interaction_risk: minimum 6 .* cannot be met: .* within the real/synthetic quotas"),
    ({"align": stage(skills={"min": {"flying": 1}})}, "stages.align.skills.min.flying: unknown skill 'flying'"),
    ({"align": stage(skills={"target": {"vehicles": 1.5}})}, r"stages.align.skills.target.vehicles: expected a fraction of the budget in \[0, 1\]"),
    ({"align": stage(real_fraction=1.5)}, r"stages.align.real_fraction: expected a number in \[0, 1\]"),
    ({"align": stage(real_fraction=-0.1)}, r"stages.align.real_fraction: expected a number in \[0, 1\]"),
    ({"align": stage(ratio="3:x")}, "stages.align.ratio: expected 'REAL:SYNTHETIC'"),
    ({"align": stage(ratio="0:0")}, "stages.align.ratio: expected two non-negative numbers"),
    ({"align": stage(real_fraction=1.0, budget=30)}, r"stages.align.real_fraction: 1 of 30 needs 30 real scenes but the stage pool has 25"),
    ({"align": stage(real_fraction=0.5, ratio="1:1")}, "give either 'real_fraction' or 'ratio'"),
    ({"align": stage(method="autoscale", real_fraction=0.5)}, "method 'autoscale' sets the real:synthetic ratio itself"),
    ({"align": stage(method="coreset", params={"depth": 3})}, r"stages.align.params: unknown parameter\(s\) \['depth'\] for method 'coreset'"),
    ({"align": stage(budget=100)}, "stages.align.budget: 100 scenes requested but the stage pool has 47"),
    ({"align": stage(method="uncertainty")}, "stages.align.scores: method 'uncertainty' needs a per-scene scores file"),
    ({"align": stage(scores="s.csv")}, "stages.align.scores: method 'random' does not use a per-scene scores file"),
    ({"align": stage(method="coreset", predictions="p.json")}, "stages.align.predictions: method 'coreset' does not use a predictions file"),
    ({"align": stage(), "router_pretrain": stage(exclude_stages=["skill_tune"])}, "stages.router_pretrain.exclude_stages: 'skill_tune' is not a stage listed before"),
    ({"align": stage(budget=30), "router_pretrain": stage(budget=30, exclude_stages=["align"])},
     "stages.router_pretrain.exclude_stages: after excluding up to 30 scenes"),
    ({"align": stage(filter={"colour": "red"})}, "stages.align.filter: no column 'colour'"),
    ({"align": stage(method="autoscale")}, "stages.align.feedback: method 'autoscale' needs closed-loop feedback"),
]


@pytest.mark.parametrize("stages, match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_plans_fail_before_any_selection(pool_dir, tmp_path, stages, match, monkeypatch):
    import curation.plan_select as plan_mod

    def no_selection(*a, **k):  # a spy: selection must never start for a bad plan
        raise AssertionError("selection ran for an invalid plan")

    monkeypatch.setattr(plan_mod, "_method_picks", no_selection)
    path = write_plan(tmp_path, pool_dir, stages)
    with pytest.raises(PlanError, match=match) as info:
        run_plan(load_plan(path), tmp_path / "out")
    assert str(path) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_plan_files(tmp_path, pool_dir):
    with pytest.raises(FileNotFoundError):
        load_plan(tmp_path / "none.yaml")
    p = tmp_path / "x.yaml"
    p.write_text("stages: [1, 2")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_plan(p)
    p.write_text(yaml.safe_dump({"pools": {"sim": str(pool_dir)}, "stages": {"align": stage()}, "extra": 1}))
    with pytest.raises(PlanError, match=r"unknown top-level key\(s\) \['extra'\]"):
        load_plan(p)
    p.write_text(yaml.safe_dump({"pools": {"sim": str(tmp_path / "missing")}, "stages": {"align": stage()}}))
    with pytest.raises(PlanError, match="pools.sim.path: .*not a ScenePool directory"):
        run_plan(load_plan(p), tmp_path / "out")
    with pytest.raises(PlanError, match=r"--pool names \['other'\]"):
        load_plan(p, {"other": str(pool_dir)})


def test_demo_plan_loads_and_cli(pool_dir, tmp_path, capsys):
    plan = load_plan(DEMO, {"sim": str(pool_dir)})
    assert [s.name for s in plan.stages] == ["align", "router_pretrain", "skill_tune"]
    assert {s.method for s in plan.stages} == {"random", "coreset", "semantic"}
    small = write_plan(tmp_path, pool_dir, {"align": GOOD["align"]})
    assert plan_main(["--plan", str(small), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "align: random selected 12 scenes (real:synthetic 6:6)" in out
    assert Selection.read(tmp_path / "cli" / "align.jsonl").budget == 12
    bad = write_plan(tmp_path, pool_dir, {"align": stage(real_fraction=2)})
    assert plan_main(["--plan", str(bad), "--out", str(tmp_path / "cli2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stages.align.real_fraction" in err and str(bad) in err
    assert plan_main(["--plan", str(small), "--out", str(tmp_path / "cli3"), "--plan-pool", "bad"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err


def test_mose_curate_plan(pool_dir, tmp_path, capsys):
    from pipelines.cli import main

    small = write_plan(tmp_path, pool_dir, {"align": GOOD["align"]})
    other = tmp_path / "elsewhere.yaml"
    other.write_text(small.read_text().replace(str(pool_dir), "/nonexistent/pool"))
    code = main(["curate", "--plan", str(other), "--plan-pool", f"sim={pool_dir}", "--out", str(tmp_path / "m"), "--seed", "3", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    sel = Selection.read(tmp_path / "m" / "align.jsonl")
    assert len(sel) == 12 and sel.seed == 3
    assert main(["curate", "--plan", str(other), "--out", str(tmp_path / "m2")]) == 2
    assert "pools.sim.path" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# soft targets met as far as the pool allows (curation/plan.py step 6, curation/plan_target_ilp.py)
# Skills are leaves of three different parents (datasets_cfg/skills.yaml), so no target skill is another's ancestor.

def _tiny_pool(tmp_path, rows):
    out = tmp_path / "tinypool"
    ScenePool.from_rows([scene(sid, source=src, skills=sk) for sid, src, sk in rows]).save(out)
    return out


# p1: agent_intent; p2: barriers; ac: agent_intent + lateral_control; c1, c2: lateral_control
TINY = [("p1", "real", ["agent_intent"]), ("p2", "real", ["barriers"]), ("ac", "real", ["agent_intent", "lateral_control"]),
        ("c1", "real", ["lateral_control"]), ("c2", "real", ["lateral_control"])]


def test_greedy_repair_misses_a_reachable_target():
    """The swap repair (plan_select._repair) from the picks [p1, p2], budget 2, one scene each of barriers,
    agent_intent, lateral_control: scarcest first (barriers 1 scene, agent_intent 2, lateral_control 3), barriers and
    agent_intent are already met by p2 and p1; for lateral_control neither pick may go (each is the only scene of a
    met target) -> short by 1. Yet {p2, ac} meets all three: the integer program finds it (the only such pair:
    barriers is only in p2, and the other scene must carry both agent_intent and lateral_control: ac)."""
    import numpy as np

    from curation import plan_target_ilp as ilp
    from curation.plan_select import _repair

    tax = load_taxonomy()
    skills = []
    for _, _, sk in TINY:
        full = set()
        for n in sk:
            while n is not None:
                full.add(n)
                n = tax.parent(n)
        skills.append(frozenset(full))
    sources = np.array(["real"] * len(TINY))
    need = {"barriers": 1, "agent_intent": 1, "lateral_control": 1}
    chosen = [0, 1]
    _, short = _repair(chosen, skills, sources, need, False, np.random.default_rng(0), {})
    assert sorted(chosen) == [0, 1] and short == {"lateral_control": 1}
    sol, why = ilp.solve(skills, sources, 2, None, {}, need, [0, 1], np.random.default_rng(0))
    assert why == "optimal" and sorted(sol) == [1, 2]  # p2, ac
    assert ilp.units(sol, skills, need) == need


def test_plan_meets_every_reachable_target_and_reports_unreachable(tmp_path):
    pool = _tiny_pool(tmp_path, TINY)
    stages = {"align": {"pools": ["sim"], "method": "random", "budget": 2,
                        "skills": {"target": {"barriers": 0.5, "agent_intent": 0.5, "lateral_control": 0.5}}},
              # barriers 1.0 of 2 -> 2 scenes, the pool has one (p2): unreachable, achieved = reachable = 1
              "router_pretrain": {"pools": ["sim"], "method": "random", "budget": 2, "skills": {"target": {"barriers": 1.0}}}}
    res = run_plan(load_plan(write_plan(tmp_path, pool, stages)), tmp_path / "out")
    align = Selection.read(res.manifests["align"])
    assert sorted(align.ids) == ["ac", "p2"]  # the only pair meeting all three (test above), whatever the method picked
    summary = json.loads(res.summary.read_text())
    a = summary["stages"]["align"]
    assert {s: (v["target"], v["achieved"], v["reachable"]) for s, v in a["skills_target"].items()} == \
        {"barriers": (1, 1, 1), "agent_intent": (1, 1, 1), "lateral_control": (1, 1, 1)}
    assert a["target_units"]["achieved"] == a["target_units"]["reachable_jointly"] == a["target_units"]["target"] == 3
    assert align.state["skills"]["target_shortfalls"] == {}
    rp = summary["stages"]["router_pretrain"]
    assert (rp["skills_target"]["barriers"]["target"], rp["skills_target"]["barriers"]["achieved"], rp["skills_target"]["barriers"]["reachable"]) == (2, 1, 1)
    assert "p2" in Selection.read(res.manifests["router_pretrain"]).ids
    assert Selection.read(res.manifests["router_pretrain"]).state["skills"]["target_shortfalls"] == {"barriers": 1}
    md = res.coverage_md.read_text()
    assert "| skill | target | achieved | reachable | greedy |" in md and "| barriers | 2 | 1 | 1 |" in md


# real: r1 barriers, r2 agent_intent + lateral_control, r3 -, r4 traffic_cones; synthetic: s1 barriers + agent_intent,
# s2 -, s3 lateral_control, s4 -
QUOTA = [("r1", "real", ["barriers"]), ("r2", "real", ["agent_intent", "lateral_control"]), ("r3", "real", []),
         ("r4", "real", ["traffic_cones"]), ("s1", "synthetic", ["barriers", "agent_intent"]), ("s2", "synthetic", []),
         ("s3", "synthetic", ["lateral_control"]), ("s4", "synthetic", [])]


def test_target_program_respects_quotas_and_minimums_and_is_deterministic(tmp_path):
    """Budget 4 at 1:1 (2 real, 2 synthetic), minimum traffic_cones 1 (only r4: forced), targets barriers 0.5 -> 2,
    agent_intent 0.25 -> 1, lateral_control 0.5 -> 2 (5 units). Alone each is reachable: barriers {r1, s1},
    agent_intent any of r2 / s1, lateral_control {r2, s3}. Jointly at most 4: two barriers need r1 and s1, then the
    real slots are r4, r1 and lateral_control has only s3 (2 + 1 + 1); without r1, barriers <= 1 (1 + 1 + 2)."""
    pool = _tiny_pool(tmp_path, QUOTA)
    stages = {"align": {"pools": ["sim"], "method": "random", "budget": 4, "real_fraction": 0.5,
                        "skills": {"min": {"traffic_cones": 1},
                                   "target": {"barriers": 0.5, "agent_intent": 0.25, "lateral_control": 0.5}}}}
    path = write_plan(tmp_path, pool, stages)
    res = run_plan(load_plan(path), tmp_path / "out")
    sel = Selection.read(res.manifests["align"])
    src = {sid: s for sid, s, _ in QUOTA}
    assert len(sel) == 4 and sum(src[i] == "real" for i in sel.ids) == 2 and "r4" in sel.ids
    a = json.loads(res.summary.read_text())["stages"]["align"]
    assert {s: (v["target"], v["reachable"]) for s, v in a["skills_target"].items()} == \
        {"barriers": (2, 2), "agent_intent": (1, 1), "lateral_control": (2, 2)}
    assert a["target_units"]["achieved"] == a["target_units"]["reachable_jointly"] == 4 and a["target_units"]["target"] == 5
    again = run_plan(load_plan(path), tmp_path / "out2")
    assert again.manifests["align"].read_bytes() == res.manifests["align"].read_bytes()


def test_target_program_failure_keeps_the_greedy_and_is_recorded(tmp_path, monkeypatch):
    from curation import plan_target_ilp as ilp

    monkeypatch.setattr(ilp, "solve", lambda *a, **k: (None, "scipy milp status 1: Time limit reached."))
    pool = _tiny_pool(tmp_path, TINY)
    stages = {"align": {"pools": ["sim"], "method": "random", "budget": 2, "skills": {"target": {"lateral_control": 0.5}}}}
    res = run_plan(load_plan(write_plan(tmp_path, pool, stages)), tmp_path / "out")
    sel = res.selections["align"]
    fb = [f for f in sel.fallbacks if f["what"] == "target_ilp"]
    assert len(fb) == 1 and "Time limit" in fb[0]["why"]
    t = sel.state["skills"]["target"]["lateral_control"]
    assert t["reachable"] is None and t["achieved"] == t["greedy"] and sel.state["skills"]["target_units"]["reachable_jointly"] is None
    assert len(sel) == 2
