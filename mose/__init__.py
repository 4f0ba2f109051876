"""MoSE: a skill-routed sparse mixture-of-experts VLM for driving.

Heavy submodules (torch, transformers) are imported on first use so that `import mose` and the
`mose` command stay fast.
"""
from __future__ import annotations

import importlib

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
