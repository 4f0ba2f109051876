"""What a selector receives besides the pool and the budget: one typed `SelectionContext`.

Each selector class declares the inputs it uses in `needs` (a frozenset of `SelectionContext` field names);
`selection_context` is the one function that builds a context, and it refuses an input that is not a field
(`SelectionError: coreset: unknown input 'depth'; ...`) or that the method does not use (`coreset: does not
use 'pilot'; it uses ...`), so a misplaced argument fails instead of being dropped. `Selector.select(pool,
budget, **inputs)` (curation/selection.py) calls it, so `CoresetSelector().select(pool, 10, pilot=p)` raises.

    ctx = selection_context("mosaic", MOSAIC.needs, pilot=pilot, exclude=pilot.eval_ids)
    MOSAIC(domain_key="location").select(pool, 100, context=ctx)

The inputs (which selectors use them: curation/registry.py lists the methods):
    features     feature matrix or column name overriding the selector's own (coreset, mosaic)
    initial_ids  scenes already selected, counted as covered (coreset)
    scores       per-scene scores: file, mapping or array (uncertainty; mosaic's importance)
    pilot        a PilotTrainer (curation/selection.py): model feedback (mosaic, sead)
    evaluator    a MixtureEvaluator (curation/autoscale.py): AutoScale's closed-loop feedback (autoscale)
    predictions  planner predictions per scene (semantic)
    train_ids    the scenes the semantic scorer trains on (semantic)
    exclude      held-out scene ids that must not be selected (mosaic, sead, autoscale)
    report_dir   directory for the method's plots and tables (semantic, autoscale)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Sequence

from curation.errors import SelectionError


@dataclass(frozen=True)
class SelectionContext:
    """The inputs of one `select` call; None (or an empty `exclude`) means not given."""

    features: Any = None
    initial_ids: Sequence[str] | None = None
    scores: Any = None
    pilot: Any = None
    evaluator: Any = None
    predictions: Any = None
    train_ids: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    report_dir: str | os.PathLike | None = None

    def given(self) -> list[str]:
        """Names of the inputs that were given (not None; `exclude` not empty), in field order."""
        return [f.name for f in fields(self) if _given(f.name, getattr(self, f.name))]


INPUTS = tuple(f.name for f in fields(SelectionContext))


def _given(name: str, value) -> bool:
    if name == "exclude":
        return value is not None and len(value) > 0
    return value is not None


def selection_context(method: str, needs: frozenset, context: SelectionContext | None = None, **inputs) -> SelectionContext:
    """The context for method `method` (which uses the inputs in `needs`): `context`'s inputs plus `inputs`.

    Raises `SelectionError` naming the method and the input for an unknown input name, an input given both in
    `context` and as a keyword, or an input the method does not use."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise SelectionError(f"{method}: unknown input(s) {unknown}; a selector's inputs are {list(INPUTS)} (the method uses {sorted(needs)})")
    values = {} if context is None else {n: getattr(context, n) for n in context.given()}
    twice = sorted(n for n in inputs if n in values and _given(n, inputs[n]))
    if twice:
        raise SelectionError(f"{method}: input(s) {twice} given both in the context and as keyword arguments")
    values.update({n: v for n, v in inputs.items() if _given(n, v)})
    unused = [n for n in INPUTS if n in values and n not in needs]
    if unused:
        uses = ", ".join(sorted(needs)) if needs else "no inputs besides the pool and the budget"
        raise SelectionError(f"{method}: does not use {', '.join(repr(n) for n in unused)}; it uses {uses}")
    return SelectionContext(**values)
