"""One method registry (curation/registry.py) and one selection context (curation/context.py): every method
the CLI, the stage plan and the data-efficiency benchmark accept is registered; an input a method does not use
raises instead of being dropped; a plan's `feedback.factory` may only name a known hook."""
from __future__ import annotations

import argparse

import pytest

from curation.context import INPUTS, SelectionContext, selection_context
from curation.registry import METHODS, method
from curation.selection import SelectionError
from tests.curation_helpers import small_pool


class NoPilot:
    def fit_and_score(self, ids):  # pragma: no cover - must never run
        raise AssertionError("the pilot was used")


def test_wrong_input_to_a_selector_raises():
    from curation.baselines import CoresetSelector, RandomSelector

    pool = small_pool(2, 4)
    with pytest.raises(SelectionError, match=r"coreset: does not use 'pilot'; it uses features, initial_ids"):
        CoresetSelector().select(pool, 3, pilot=NoPilot())
    with pytest.raises(SelectionError, match=r"random: does not use 'scores'"):
        RandomSelector().select(pool, 3, scores={s: 1.0 for s in pool.ids})
    with pytest.raises(SelectionError, match=r"coreset: unknown input\(s\) \['depth'\]"):
        CoresetSelector().select(pool, 3, depth=2)
    with pytest.raises(SelectionError, match=r"coreset: does not use 'pilot'"):  # also inside a context object
        CoresetSelector().select(pool, 3, SelectionContext(pilot=NoPilot()))
    with pytest.raises(SelectionError, match=r"given both in the context and as keyword arguments"):
        CoresetSelector().select(pool, 3, SelectionContext(initial_ids=pool.ids[:1]), initial_ids=pool.ids[:2])
    # the same selection through keywords and through the context built by the registry
    a = CoresetSelector(random_state=1).select(pool, 3, initial_ids=pool.ids[:1])
    b = CoresetSelector(random_state=1).select(pool, 3, method("coreset").context(initial_ids=pool.ids[:1]))
    assert a.ids == b.ids and len(a) == 3 and pool.ids[0] not in a.ids


def test_registry_lists_every_method_the_cli_plan_and_benchmark_accept():
    from benchmarks.data_efficiency_methods import RUNNERS
    from pipelines.curate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "method")
    assert set(choices) == set(METHODS) == set(RUNNERS)
    assert set(METHODS) == {"random", "coreset", "uncertainty", "mosaic", "sead", "semantic", "autoscale"}
    for name, m in METHODS.items():
        assert m.name == name == m.selector.method == m.section
        assert m.needs <= set(INPUTS) and m.requires <= m.needs, name
        assert m.pilot_unless is None or m.pilot_unless in m.parameters()
        assert m.plot_param is None or m.plot_param in m.parameters()
        assert "random_state" in m.parameters()
    assert METHODS["mosaic"].uses_pilot({}) and not METHODS["mosaic"].uses_pilot({"fits": [{"a": 1, "tau": 1}]})
    assert METHODS["sead"].uses_pilot({}) and not METHODS["coreset"].uses_pilot({})
    with pytest.raises(SelectionError, match=r"unknown selection method 'magic'; expected one of \['autoscale'"):
        method("magic")
    with pytest.raises(SelectionError, match=r"unknown parameter\(s\) \['depth'\] for method 'coreset'"):
        method("coreset").build({"depth": 3})


def test_selection_context_is_built_by_one_function():
    ctx = selection_context("mosaic", METHODS["mosaic"].needs, exclude=["a"], pilot=None)
    assert ctx == SelectionContext(exclude=["a"]) and ctx.given() == ["exclude"]
    assert selection_context("random", frozenset()).given() == []
    with pytest.raises(SelectionError, match="random: does not use 'exclude'; it uses no inputs"):
        selection_context("random", frozenset(), exclude=["a"])


def test_cli_refuses_an_input_the_method_does_not_use(tmp_path, capsys):
    from pipelines.cli import main

    pool_dir = tmp_path / "pool"
    small_pool(2, 4).save(pool_dir)
    scores = tmp_path / "s.csv"
    scores.write_text("id,score\n" + "".join(f"log{i}_{k:03d},1.0\n" for i in range(2) for k in range(4)))
    code = main(["curate", "--method", "random", "--pool", str(pool_dir), "--budget", "3", "--out", str(tmp_path / "r.jsonl"),
                 "--scores", str(scores)])
    assert code == 2
    assert "random: does not use 'scores'" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_feedback_factory_names_only_known_hooks(monkeypatch):
    import importlib
    import os

    from curation.plan import PlanError
    from pipelines.curate_hooks import DEFAULT_FEEDBACK, FEEDBACK_HOOKS, feedback_factory

    def spy(*a, **k):
        raise AssertionError("the configuration ran code")

    monkeypatch.setattr(os, "getcwd", spy)
    monkeypatch.setattr(importlib, "import_module", spy)
    with pytest.raises(PlanError, match=r"unknown feedback hook 'os:getcwd'; expected one of \['closed_loop'\]"):
        feedback_factory({"factory": "os:getcwd"}, pool=None)
    with pytest.raises(PlanError, match="unknown feedback hook"):
        feedback_factory({"factory": ["closed_loop"]}, pool=None)
    assert DEFAULT_FEEDBACK == "closed_loop" and set(FEEDBACK_HOOKS) == {"closed_loop"}
    made = feedback_factory({"target": 0.5}, pool="P", hooks={"closed_loop": lambda pool, **kw: (pool, kw)})  # the default name
    assert made == ("P", {"target": 0.5})
