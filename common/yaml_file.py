"""One reader for every YAML file the project takes (stage plans, training configs, the demo config, the taxonomy,
curation sections): the same checks and the same messages, naming the file, wherever the file is read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ConfigFileError


def read_yaml(path: str | os.PathLike, *, what: str = "YAML file", expect: type | tuple[type, ...] = dict,
              empty: Any = None, error: type[Exception] = ConfigFileError) -> Any:
    """The parsed top level of a YAML file, which must be an instance of `expect`.

    `what` names the file in messages ("plan file", "training config"); an empty file gives `empty` when that is not
    None. Every failure (missing, a directory, not UTF-8, not valid YAML, wrong top-level type) raises `error` with
    the path first, so the caller's own error class, and its message, reach the user.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: {what} cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    if data is None and empty is not None:
        return empty
    if not isinstance(data, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        shown = {"dict": "a mapping", "list": "a list"}.get(names, names)
        raise error(f"{path}: expected {shown} at the top of the {what}, got {type(data).__name__}")
    return data
