"""The one registry of selection methods: name -> selector class, the inputs it uses, its config section.

    from curation.registry import METHODS, method
    m = method("mosaic")                       # a Method; unknown names raise SelectionError listing the known ones
    selector = m.build({"n_domains": 4}, defaults={"progress": False}, overrides={"random_state": 0})
    selection = selector.select(pool, 100, pilot=pilot, exclude=pilot.eval_ids)

Used by the `mose curate` composition (pipelines/curate.py: --method choices, config sections, which
methods get the fast pilot or AutoScale's feedback), by the stage plan (curation/plan_spec.py checks a
stage's method and parameters; curation/plan_select.py builds the selector and its inputs) and by the
data-efficiency benchmark (benchmarks/data_efficiency_methods.py). What a method receives is declared by its
selector class (`needs`, names of `curation.context.SelectionContext` fields); this module adds what the
composition must know to provide it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from curation.autoscale import AutoScaleSelector
from curation.baselines import CoresetSelector, RandomSelector, UncertaintySelector
from curation.context import SelectionContext, selection_context
from curation.mosaic import MOSAIC
from curation.sead import SEAD
from curation.selection import SelectionError
from curation.semantic import SemanticSelector


@dataclass(frozen=True)
class Method:
    """A selection method. `section` is its section in a `mose curate --config` file (and the benchmark's
    config); `requires` are the inputs it cannot run without; `pilot_unless` names a constructor parameter
    that, when set, replaces the pilot (MOSAIC's `fits`); `sets_ratio`: the method chooses the real:synthetic
    ratio itself (a plan may not fix one); `plot_param`: the constructor parameter naming its plot directory."""

    name: str
    selector: type
    summary: str
    requires: frozenset = frozenset()
    pilot_unless: str | None = None
    sets_ratio: bool = False
    plot_param: str | None = None

    @property
    def section(self) -> str:
        return self.name

    @property
    def needs(self) -> frozenset:
        """The `SelectionContext` inputs the selector uses (its class attribute `needs`)."""
        return self.selector.needs

    def parameters(self) -> list[str]:
        """The selector's constructor parameters, sorted."""
        return sorted(set(inspect.signature(self.selector.__init__).parameters) - {"self"})

    def unknown_parameters(self, params: dict) -> list[str]:
        return sorted(set(params) - set(self.parameters()))

    def uses_pilot(self, params: dict) -> bool:
        """Whether the composition should build a pilot (model feedback) for this method with these parameters."""
        return "pilot" in self.needs and (self.pilot_unless is None or params.get(self.pilot_unless) is None)

    def build(self, params: dict, *, defaults: dict | None = None, overrides: dict | None = None, where: str = "config"):
        """The selector: `defaults` (only those the constructor takes), then `params`, then `overrides`.
        Unknown `params` raise SelectionError naming `where`."""
        bad = self.unknown_parameters(params)
        if bad:
            raise SelectionError(f"{where}: unknown parameter(s) {bad} for method {self.name!r}; expected some of {self.parameters()}")
        names = set(self.parameters())
        kw = {k: v for k, v in (defaults or {}).items() if k in names}
        kw.update(params)
        kw.update(overrides or {})
        return self.selector(**kw)

    def context(self, context: SelectionContext | None = None, **inputs) -> SelectionContext:
        """The method's `SelectionContext` (curation.context.selection_context: inputs it does not use raise)."""
        return selection_context(self.name, self.needs, context, **inputs)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("random", RandomSelector, "uniform random sample"),
    Method("coreset", CoresetSelector, "k-center greedy on scene features"),
    Method("uncertainty", UncertaintySelector, "highest per-scene scores first", requires=frozenset({"scores"})),
    Method("mosaic", MOSAIC, "per-domain scaling laws from pilot runs, max-marginal-gain allocation", pilot_unless="fits",
           plot_param="plot_dir"),
    Method("sead", SEAD, "static x dynamic strata, feature-shift rounds, key frames"),
    Method("semantic", SemanticSelector, "safety / rarity / uncertainty in a learned scene space"),
    Method("autoscale", AutoScaleSelector, "closed-loop real-synthetic mixture (Cluster-GA)", requires=frozenset({"evaluator"}),
           sets_ratio=True),
)}


def method(name: str) -> Method:
    """The registered method `name`; SelectionError listing the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise SelectionError(f"unknown selection method {name!r}; expected one of {sorted(METHODS)}") from None
