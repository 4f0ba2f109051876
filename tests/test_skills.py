"""Skill taxonomy: the packaged tree, expert groups against hand computations, validation errors, text fallback."""
import subprocess
import sys
import textwrap

import pytest

from mose.skills import Taxonomy, TaxonomyError, UnknownSkillError, default_path

LEVEL2 = {
    "perception": ["vehicles", "vulnerable_road_users", "traffic_signs", "traffic_lights", "traffic_cones", "barriers",
                   "other_objects", "scene_conditions"],
    "prediction": ["agent_intent", "interaction_risk"],
    "planning": ["longitudinal_control", "lateral_control", "rule_compliance", "trajectory"],
}


@pytest.fixture(scope="module")
def tax():
    return Taxonomy.load()


def write(tmp_path, body: str):
    p = tmp_path / "skills.yaml"
    p.write_text(textwrap.dedent(body))
    return p


def test_packaged_tree(tax):
    assert default_path().name == "skills.yaml" and default_path().parent.name == "datasets_cfg"
    assert tax.roots == ["perception", "prediction", "planning"]
    for root, kids in LEVEL2.items():
        assert tax.children(root) == kids
        assert all(tax.root_of(k) == root and tax.depth(k) == 1 for k in kids)
    assert tax.leaves == [k for kids in LEVEL2.values() for k in kids]
    assert [tax.id(n) for n in tax.names] == list(range(len(tax)))


def test_expert_groups_match_hand_computation(tax):
    g = tax.expert_groups(8)
    # equal shares: quotas 8/3 each -> floors 2,2,2, the two leftover experts go to the first two roots
    assert g["perception"] == [0, 1, 2] and g["prediction"] == [3, 4, 5] and g["planning"] == [6, 7]
    # 8 perception children over 3 experts: child k starts at floor(k * 3 / 8) -> 0,0,0,1,1,1,2,2
    assert [g[c][0] for c in LEVEL2["perception"]] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert g["agent_intent"] == [3] and g["interaction_risk"] == [4]  # 2 children over 3 experts: starts 0, 1
    assert [g[c] for c in LEVEL2["planning"]] == [[6], [6], [7], [7]]
    for E in (3, 4, 7, 16, 64):
        g = tax.expert_groups(E)
        roots = [set(g[r]) for r in tax.roots]
        assert set().union(*roots) == set(range(E)) and sum(map(len, roots)) == E  # a partition
        for n in tax.names:
            assert g[n], n
            if tax.parent(n):
                assert set(g[n]) <= set(g[tax.parent(n)])


def test_shares_and_explicit_experts(tmp_path):
    p = write(tmp_path, """
        experts: {fine_experts: 2, shared_expert: true}
        skills:
          a: {expert_share: 2}
          b: {}
          c: {}
          a1: {parent: a}
          a2: {parent: a, experts: [3]}
          a3: {parent: a, num_experts: 1}
    """)
    t = Taxonomy.from_yaml(p)
    g = t.expert_groups(8)
    assert g["a"] == [0, 1, 2, 3] and g["b"] == [4, 5] and g["c"] == [6, 7]  # shares 2:1:1
    assert g["a1"] == [0, 1] and g["a2"] == [3] and g["a3"] == [2]  # a3 starts at floor(2*4/3) = 2
    assert t.shared_expert is True
    kw = t.config_kwargs(8)
    assert kw["skill_groups"] == g and list(kw["skill_groups"]) == t.names and kw["num_experts"] == 8
    assert kw["skill_parents"] == {"a1": "a", "a2": "a", "a3": "a"} and kw["shared_expert"] is True


def test_config_kwargs_build_a_valid_mose_config(tax):
    from transformers import LlavaConfig

    from mose.config import MoSEConfig

    base = LlavaConfig(text_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128},
                       vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8})
    cfg = MoSEConfig(base_config=base, top_k=1, **tax.config_kwargs(6))
    assert cfg.skill_names == tax.names
    parents = cfg.skill_parent_ids()
    assert parents[tax.id("vehicles")] == tax.id("perception") and parents[tax.id("perception")] == -1


@pytest.mark.parametrize("body, match", [
    ("skills:\n  a: {}\n  b: {parent: c}\n", r"skills\.b\.parent: unknown parent 'c'"),
    ("skills:\n  a: {parent: b}\n  b: {parent: a}\n", r"cycle in the skill tree: a -> b -> a"),
    ("skills:\n  a: {}\n  b: {parent: a, num_experts: 0}\n", r"skills\.b\.num_experts: a skill without experts"),
    ("skills:\n  a: {}\n  b: {parent: a, experts: []}\n", r"skills\.b\.experts: a skill without experts"),
    ("skills:\n  a: {expert_share: 0}\n", r"skills\.a\.expert_share"),
    ("skills:\n  a: {aliases: [x]}\n  b: {aliases: [X]}\n", r"skills\.b\.aliases: 'X' already names skill 'a'"),
    ("skills:\n  a: {keywords: ['(unclosed']}\n", r"skills\.a\.keywords"),
    ("skills:\n  a: {colour: red}\n", r"skills\.a: unknown key"),
    ("skills:\n  Bad-Name: {}\n", r"lower_snake_case"),
    ("nothing: 1\n", r"non-empty 'skills'"),
    ("skills: [a, b\n", r"not valid YAML"),
])
def test_validation_names_file_and_key(tmp_path, body, match):
    p = write(tmp_path, body)
    with pytest.raises(TaxonomyError, match=match) as exc:
        Taxonomy.from_yaml(p)
    assert str(p) in str(exc.value)


def test_too_few_experts_and_explicit_outside_parent(tmp_path, tax):
    with pytest.raises(TaxonomyError, match="no experts"):
        tax.expert_groups(2)
    t = Taxonomy.from_yaml(write(tmp_path, "skills:\n  a: {}\n  b: {}\n  a1: {parent: a, experts: [3]}\n"))
    with pytest.raises(TaxonomyError, match=r"skills\.a1\.experts: \[3\] must lie inside the parent 'a'"):
        t.expert_groups(4)  # a gets [0, 1]
    assert t.expert_groups(8)["a1"] == [3]  # a gets [0..3]


def test_resolve_aliases_and_unknown(tax):
    assert tax.resolve("traffic cones") == "traffic_cones"  # CODA key with a space
    assert tax.resolve("vulnerable_road_users") == "vulnerable_road_users"
    assert tax.resolve("VRU") == "vulnerable_road_users"
    assert tax.resolve("traffic_cone") == "traffic_cones"  # ScenePool agent category
    assert tax.resolve("czone_sign") == "traffic_signs"
    with pytest.raises(UnknownSkillError, match="unknown skill 'flying'") as exc:
        tax.resolve("flying", "scene x")
    assert "scene x" in str(exc.value) and "vehicles" in str(exc.value)
    assert tax.try_resolve("flying") is None


def test_text_fallback(tax):
    assert tax.classify_text("Slow down and keep a safe distance.", within="planning") == "longitudinal_control"
    assert tax.classify_text("Change lanes to the left to pass.", within="planning") == "lateral_control"
    assert tax.classify_text("Obey the red light and the speed limit.", within="planning") == "rule_compliance"
    assert tax.classify_text("A pedestrian is walking on the crosswalk.") == "vulnerable_road_users"
    assert tax.classify_text("The weather is foggy at night.") == "scene_conditions"
    assert tax.classify_text("Nothing to report.") is None
    assert tax.classify_coarse("The truck will likely cut in.") == "prediction"  # truck: 1 perception hit; will, likely, cut in: 3
    assert tax.classify_coarse("The cyclist is likely to cross; there is a collision risk.") == "prediction"


def test_skills_module_imports_nothing_heavy():
    code = "import sys, mose.skills, mose.skill_format\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'curation', 'training', 'eval', 'datasets_cfg') and m != 'datasets_cfg'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
