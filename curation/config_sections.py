"""A YAML file of named sections, each a mapping of parameters (`mose curate --config`, the benchmarks' overrides)."""
from __future__ import annotations

from pathlib import Path

from curation.selection import SelectionError


def load_sections(path: str | None, allowed, error=SelectionError) -> dict:
    """A YAML file of named sections, each a mapping of parameters; `allowed` names the sections it may hold."""
    if not path:
        return {}
    from common.yaml_file import read_yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found")
    cfg = read_yaml(p, what="config file", expect=object, error=error) or {}
    if not isinstance(cfg, dict):
        raise error(f"{p}: expected a mapping of sections ({', '.join(sorted(allowed))}), got {type(cfg).__name__}")
    bad = sorted(set(cfg) - set(allowed))
    if bad:
        raise error(f"{p}: unknown section(s) {bad}; expected some of {sorted(allowed)}")
    for name, section in cfg.items():
        if not isinstance(section, dict):
            raise error(f"{p}: section {name!r}: expected a mapping of parameters, got {section!r}")
    return cfg
