"""The dependency rule of docs/architecture.md, checked on the source text (pure `ast`, nothing is imported).

Package order, low -> high; a module may import only modules of its own package or of a package in a LOWER layer:

    common < mose < datasets_cfg < curation < training, eval < pipelines

(training and eval share a layer, so they never import each other; nothing imports pipelines, the top layer).
An import is any of:
- `import x.y` / `from x.y import z` / `from . import z`, at module level or inside a function (relative imports
  are resolved against the importing module's package);
- a string literal that names a project module: the argument of `importlib.import_module("x.y")` /
  `__import__("x.y")`, or any other string constant that is exactly a dotted project module path ("pkg.module")
  or a "pkg.module:attr" spec (registries of commands or factories). Docstrings and bare string statements are
  not data and are skipped; a single word ("eval") counts only as an import_module argument.

The check fails on (a) any import circle between modules, reported as a path with the file:line of every arrow,
and (b) any arrow that breaks the package order, reported as file:line. The checker itself is tested on small
synthetic package trees, so it cannot pass by finding nothing.
"""
from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Low -> high. A package may import packages of lower layers only; packages of one layer never import each other.
LAYERS: tuple[tuple[str, ...], ...] = (("common",), ("mose",), ("datasets_cfg",), ("curation",), ("training", "eval"), ("pipelines",))


@dataclass(frozen=True)
class Arrow:
    src: str  # importing module, dotted
    dst: str  # imported project module (the longest existing prefix of the name), or the bare package name
    path: str  # importing file, relative to the root
    line: int
    kind: str  # "import", "string" or "import_module"

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def find_modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the given top-level packages that exist under root."""
    modules: dict[str, Path] = {}
    for pkg in packages:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path], packages: set[str]) -> str | None:
    """The project module a dotted name refers to: its longest existing prefix, else the bare package; None if the
    name is not in a project package."""
    parts = name.split(".")
    if parts[0] not in packages:
        return None
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return parts[0]


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of string constants that are statements (docstrings, bare strings): not data."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            skip.add(id(node.value))
    return skip


def collect_arrows(root: Path, packages: list[str]) -> tuple[list[Arrow], dict[str, Path]]:
    modules = find_modules(root, packages)
    arrows: list[Arrow] = []
    for module, path in modules.items():
        arrows += _module_arrows(module, path.relative_to(root).as_posix(), path.read_text(encoding="utf-8"), modules, set(packages))
    return arrows, modules


def _module_arrows(module: str, rel: str, source: str, modules: dict[str, Path], pkgs: set[str]) -> list[Arrow]:
    arrows: list[Arrow] = []
    tree = ast.parse(source, filename=rel)
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    skip = _docstring_nodes(tree)
    call_args: set[int] = set()

    def add(name: str, line: int, kind: str) -> None:
        dst = _resolve(name, modules, pkgs)
        if dst is not None and dst != module:
            arrows.append(Arrow(module, dst, rel, line, kind))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, "import")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}" if alias.name != "*" else base
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
                add(full if full in modules else base, node.lineno, "import")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if fname in ("import_module", "__import__"):
                call_args.add(id(node.args[0]))
                target = node.args[0].value
                if target.startswith("."):  # import_module(".x", package="pkg")
                    pkg_kw = next((k.value.value for k in node.keywords if k.arg == "package" and isinstance(k.value, ast.Constant)), package)
                    dots = len(target) - len(target.lstrip("."))
                    anchor = str(pkg_kw).split(".")
                    anchor = anchor[: len(anchor) - (dots - 1)] if dots > 1 else anchor
                    target = ".".join(anchor + [target.lstrip(".")]) if target.lstrip(".") else ".".join(anchor)
                add(target, node.lineno, "import_module")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip and id(node) not in call_args:
            text = node.value.strip()
            name = text.split(":", 1)[0] if text.count(":") == 1 else text
            if ("." in name or ":" in text) and name in modules:
                add(name, node.lineno, "string")
    return arrows


def order_violations(arrows: list[Arrow], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    level = {pkg: i for i, layer in enumerate(layers) for pkg in layer}
    out = []
    for a in arrows:
        src_pkg, dst_pkg = a.src.split(".")[0], a.dst.split(".")[0]
        if src_pkg != dst_pkg and level[dst_pkg] >= level[src_pkg]:
            why = "same layer" if level[dst_pkg] == level[src_pkg] else "upward"
            out.append(f"{a.where()}: {a.src} -> {a.dst} ({why}, {a.kind})")
    return sorted(set(out))


def find_cycles(arrows: list[Arrow]) -> list[str]:
    """One shortest circle per strongly connected component of the module graph, as 'a -> b -> a' with file:line."""
    graph: dict[str, dict[str, Arrow]] = {}
    for a in arrows:
        graph.setdefault(a.src, {}).setdefault(a.dst, a)
        graph.setdefault(a.dst, {})
    # Tarjan's strongly connected components, iterative.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    components.append(sorted(comp))
    cycles = []
    for comp in components:
        members = set(comp)
        start = comp[0]
        # Breadth-first search inside the component for the shortest way back to start.
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph[node]):
                    if child not in members:
                        continue
                    if child == start:
                        found = node
                        break
                    if child not in prev:
                        prev[child] = node
                        nxt.append(child)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()
        path.append(start)
        steps = [f"{a} -> {b} ({graph[a][b].where()})" for a, b in itertools.pairwise(path)]
        cycles.append(" -> ".join(path) + "\n    " + "\n    ".join(steps))
    return cycles


def check(root: Path, layers: tuple[tuple[str, ...], ...] = LAYERS) -> tuple[list[str], list[str], int]:
    """(circles, order violations, number of arrows found)."""
    packages = [pkg for layer in layers for pkg in layer]
    arrows, _ = collect_arrows(root, packages)
    return find_cycles(arrows), order_violations(arrows, layers), len(arrows)


def _report(cycles: list[str], violations: list[str]) -> str:
    lines = []
    if cycles:
        lines.append(f"{len(cycles)} import circle(s):")
        lines += [f"  {c}" for c in cycles]
    if violations:
        lines.append(f"{len(violations)} import(s) against the package order {' < '.join(', '.join(layer) for layer in LAYERS)}:")
        lines += [f"  {v}" for v in violations]
    return "\n".join(lines)


def test_the_package_tree_follows_the_dependency_rule():
    cycles, violations, n_arrows = check(ROOT)
    assert n_arrows > 100, "the checker found almost no imports: it is not reading the tree"
    assert not cycles and not violations, "\n" + _report(cycles, violations)


# --- the checker itself, on synthetic trees ---------------------------------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


TINY_LAYERS = (("low",), ("mid",), ("left", "right"), ("top",))


def test_checker_passes_a_clean_tree_and_sees_every_kind_of_import(tmp_path):
    root = _tree(tmp_path, {
        "low/__init__.py": '"""low.core"""\n',  # a docstring is no import
        "low/core.py": "X = 1\n",
        "low/sub/__init__.py": "",
        "low/sub/deep.py": "from .. import core\nfrom ..core import X\n",
        "mid/__init__.py": "",
        "mid/a.py": "import low.core\n\ndef f():\n    from low.sub import deep\n    return deep\n",
        "left/__init__.py": "",
        "left/m.py": "import importlib\nimport os\nMOD = importlib.import_module('low.core')\nREG = {'x': 'mid.a:f'}\n",
        "top/__init__.py": "",
        "top/cli.py": "from left import m\nfrom right import *\nCOMMANDS = ('left.m', 'eval', 'not.a.module')\n",
        "right/__init__.py": "",
    })
    arrows, _ = collect_arrows(root, [p for layer in TINY_LAYERS for p in layer])
    found = {(a.src, a.dst, a.kind) for a in arrows}
    assert found == {
        ("low.sub.deep", "low.core", "import"),
        ("mid.a", "low.core", "import"),
        ("mid.a", "low.sub.deep", "import"),
        ("left.m", "low.core", "import_module"),
        ("left.m", "mid.a", "string"),
        ("top.cli", "left.m", "import"),
        ("top.cli", "right", "import"),
        ("top.cli", "left.m", "string"),
    }
    assert check(root, TINY_LAYERS)[:2] == ([], [])


def test_checker_finds_a_circle_and_reports_it_as_a_path(tmp_path):
    root = _tree(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "from low import b\n",
        "low/b.py": "X = 1\n\ndef f():\n    import low.c\n",
        "low/c.py": "from .a import *\n",
        "low/d.py": "import low.a\n",  # leads into the circle, is not part of it
    })
    cycles, violations, _ = check(root, TINY_LAYERS)
    assert violations == []
    assert len(cycles) == 1
    assert cycles[0].splitlines()[0] == "low.a -> low.b -> low.c -> low.a"
    assert "low/b.py:4" in cycles[0] and "low/c.py:1" in cycles[0] and "low/a.py:1" in cycles[0]


def test_checker_finds_upward_same_layer_and_string_imports(tmp_path):
    root = _tree(tmp_path, {
        "low/__init__.py": "",
        "low/core.py": "def f():\n    import mid.a\n",  # upward, inside a function
        "mid/__init__.py": "",
        "mid/a.py": "X = 1\n",
        "left/__init__.py": "",
        "left/m.py": "FACTORY = 'right.n:Thing'\n",  # same layer, as a string spec
        "right/__init__.py": "",
        "right/n.py": "import importlib\nimportlib.import_module('top.cli')\n",  # nothing imports top
        "top/__init__.py": "",
        "top/cli.py": "",
    })
    cycles, violations, _ = check(root, TINY_LAYERS)
    assert cycles == []
    assert violations == [
        "left/m.py:1: left.m -> right.n (same layer, string)",
        "low/core.py:2: low.core -> mid.a (upward, import)",
        "right/n.py:2: right.n -> top.cli (upward, import_module)",
    ]
