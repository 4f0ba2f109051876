"""Self-contained checkpoints: the model code written next to the weights, for `trust_remote_code=True` loading.

`MoSEForConditionalGeneration.save_pretrained` calls `write_remote_code`, which copies the modules that define the
config and model classes, and every project module they import (at module level or inside a function), into the
checkpoint directory as one flat set of files (`mose.moe` -> `mose_moe.py`, `common.errors` -> `common_errors.py`),
with each project import rewritten to a relative one (`from mose.skills import Taxonomy` ->
`from .mose_skills import Taxonomy`), and returns the `auto_map` for config.json. This is the layout transformers'
dynamic module loader expects: it copies the file named in `auto_map` plus, recursively, the files of its relative
`from .x import` statements from the same directory (transformers/dynamic_module_utils.py: `get_relative_imports`,
`get_relative_import_files`), and refuses a file whose absolute imports are not installed (`check_imports`), so no
`mose` or `common` import may remain. A clean environment with transformers and torch then loads the checkpoint with
`AutoModelForImageTextToText.from_pretrained(ckpt, trust_remote_code=True)`, without this package.

The registration with the Auto classes is not copied along: it runs only for the in-package modules (their
`__name__` starts with "mose."), so loading remote code never replaces the package's own registered classes.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from common.atomic import write_text
from common.errors import MoseError

# the project's top-level packages: imports of these are rewritten; everything else must be installed where it loads
PROJECT_PACKAGES = ("common", "mose", "datasets_cfg", "curation", "training", "eval", "pipelines")
# Auto classes that the checkpoint's config.json maps to the copied classes
MODEL_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForCausalLM")


class RemoteCodeError(MoseError, RuntimeError):
    """The model code cannot be written as a self-contained set of files."""


def flat_name(module: str) -> str:
    """File stem of a project module in the checkpoint: `mose.moe` -> `mose_moe`."""
    return module.replace(".", "_")


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise RemoteCodeError(f"remote code: cannot find the source file of module {module!r}.")
    return Path(spec.origin)


def _target(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute module a `from ... import` names, or None when it is not a project module."""
    if node.level == 0:
        name = node.module or ""
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    return name if name.split(".")[0] in PROJECT_PACKAGES else None


def _project_imports(module: str, source: str, path: Path) -> list[tuple[ast.ImportFrom, str]]:
    out = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in PROJECT_PACKAGES]
            if bad:
                raise RemoteCodeError(f"remote code: {path}:{node.lineno}: `import {', '.join(bad)}` cannot be made "
                                      "relative; use `from package.module import name`.")
        elif isinstance(node, ast.ImportFrom):
            target = _target(node, module, path.name == "__init__.py")
            if target is None:
                continue
            if node.module is None or _is_package(target):
                raise RemoteCodeError(f"remote code: {path}:{node.lineno}: imports from the package {target!r} itself; "
                                      "import from the module that defines the name instead.")
            out.append((node, target))
    return out


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def flatten_sources(roots: list[str]) -> dict[str, str]:
    """File name -> rewritten source for the root modules and every project module they import, recursively."""
    files: dict[str, str] = {}
    todo, seen = list(roots), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines(keepends=True)
        for node, target in _project_imports(module, source, path):
            line = lines[node.lineno - 1]
            new, count = re.subn(r"^(\s*from\s+)\.*[\w.]*(\s+import\b)", rf"\g<1>.{flat_name(target)}\g<2>", line)
            if count != 1:
                raise RemoteCodeError(f"remote code: {path}:{node.lineno}: cannot rewrite the import {line.strip()!r}.")
            lines[node.lineno - 1] = new
            todo.append(target)
        files[f"{flat_name(module)}.py"] = "".join(lines)
    return files


def auto_map(config_cls: type, model_cls: type) -> dict[str, str]:
    """config.json's `auto_map`: Auto class -> "file_stem.ClassName" of the copied classes."""
    out = {"AutoConfig": f"{flat_name(config_cls.__module__)}.{config_cls.__name__}"}
    out.update({auto: f"{flat_name(model_cls.__module__)}.{model_cls.__name__}" for auto in MODEL_AUTO_CLASSES})
    return out


def write_remote_code(directory: str | Path, config_cls: type, model_cls: type) -> list[Path]:
    """Write the flattened model code into `directory` (each file atomically); returns the files written."""
    files = flatten_sources([config_cls.__module__, model_cls.__module__])
    written = []
    for name, text in sorted(files.items()):
        write_text(Path(directory) / name, text)
        written.append(Path(directory) / name)
    return written


__all__ = ["RemoteCodeError", "auto_map", "flat_name", "flatten_sources", "write_remote_code", "PROJECT_PACKAGES"]
