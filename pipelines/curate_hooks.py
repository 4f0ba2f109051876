"""What the `mose curate` composition hands to curation from evaluation: the fast pilot (eval/pilot.py) and AutoScale's
closed-loop feedback (eval/autoscale_feedback.py), each built by name from a fixed registry, so a configuration file
can choose among known hooks but never name code to import.

Used by `mose curate` (pipelines/curate.py), stage plans (pipelines/curate_plan.py) and the demo.
"""
from __future__ import annotations

from curation.selection import SelectionError

PILOT_KEYS = ("eval_fraction", "eval_size", "max_eval", "model", "alpha", "metric", "tracking", "human_filter")


def make_pilot(pool, params: dict, seed: int | None, where: str = "config"):
    from eval.pilot import FastPilot  # eval depends on curation, never the reverse: import here only

    bad = sorted(set(params) - set(PILOT_KEYS))
    if bad:
        raise SelectionError(f"{where}: section 'pilot': unknown parameter(s) {bad}; expected some of {sorted(PILOT_KEYS)}")
    return FastPilot.from_pool(pool, random_state=0 if seed is None else seed, **params)


def closed_loop_feedback(pool, **kw):
    """AutoScale's closed-loop evaluator (eval/autoscale_feedback.py): the fast pilot driven in highway-env."""
    from eval.autoscale_feedback import ClosedLoopFeedback

    return ClosedLoopFeedback(pool, **kw)


# the feedback hooks a plan's (or --config's) `feedback.factory` may name
FEEDBACK_HOOKS = {"closed_loop": closed_loop_feedback}
DEFAULT_FEEDBACK = "closed_loop"


def pilot_factory(pool, params: dict, seed: int):
    return make_pilot(pool, params, seed, "plan pilot")


def feedback_factory(spec: dict, pool, hooks: dict | None = None):
    """The AutoScale evaluator: spec = {"factory": a name of `hooks` (default FEEDBACK_HOOKS), **keyword arguments}.

    An unknown name (e.g. a "module:attr" string) raises PlanError listing the known names; nothing is imported."""
    from curation.plan import PlanError

    hooks = FEEDBACK_HOOKS if hooks is None else hooks
    spec = dict(spec or {})
    name = spec.pop("factory", DEFAULT_FEEDBACK)
    if not isinstance(name, str) or name not in hooks:
        raise PlanError(f"feedback.factory: unknown feedback hook {name!r}; expected one of {sorted(hooks)}")
    return hooks[name](pool, **spec)
