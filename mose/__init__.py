"""MoSE: a skill-routed sparse mixture-of-experts VLM for driving.

Heavy submodules (torch, transformers) are imported on first use so that `import mose` and the
`mose` command stay fast.

`import mose` registers MoSE with transformers' Auto classes (`AutoConfig`, `AutoModelForImageTextToText`,
`AutoModelForCausalLM`), so a MoSE checkpoint loads with plain `AutoModelForImageTextToText.from_pretrained(ckpt)`.
To keep `import mose.skills` free of torch and transformers, the registration runs when it is cheap to: at once if
transformers is already imported, else right after transformers' own `import` finishes (a one-shot import hook on
`sys.meta_path`); `mose.config` and `mose.modeling` also call it at the end of their import.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> submodule that defines it (resolved lazily, PEP 562)
_LAZY = {
    "MoSEConfig": "mose.config",
    "MoSEForConditionalGeneration": "mose.modeling",
    "upcycle": "mose.modeling",
    "build_preset": "mose.presets",
    "PRESETS": "mose.presets",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mose' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]

_state = {"registered": False, "busy": False}


def _register_auto_classes() -> None:
    """Register MoSEConfig / MoSEForConditionalGeneration with the Auto classes, once, when that is possible: transformers
    imported and neither `mose.config` nor `mose.modeling` half-imported (each calls this again on its last line)."""
    if _state["registered"] or _state["busy"] or "transformers" not in sys.modules:
        return
    for name in ("mose.config", "mose.modeling"):
        module = sys.modules.get(name)
        if module is not None and not getattr(module, "_DEFINED", False):
            return  # mid-import; that module calls this when it is complete
    _state["busy"] = True
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        config_cls = importlib.import_module("mose.config").MoSEConfig
        model_cls = importlib.import_module("mose.modeling").MoSEForConditionalGeneration
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForImageTextToText.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        _state["registered"] = True
    finally:
        _state["busy"] = False


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """One-shot `sys.meta_path` hook: lets the normal finders locate `transformers`, then runs the registration right
    after transformers' `__init__` has executed (its module object is complete by then)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            try:
                _register_auto_classes()
            except Exception as exc:  # a failed registration must never break `import transformers` itself
                import warnings

                warnings.warn(f"mose: could not register MoSE with transformers' Auto classes ({type(exc).__name__}: {exc}); "
                              "import mose.modeling to see the error", RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformersImport())
