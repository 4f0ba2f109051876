"""The hierarchical driving-skill taxonomy and its mapping onto expert groups.

The taxonomy lives in `datasets_cfg/skills.yaml` (package data; see the comments there for every key). Roots
are the coarse skills (perception, prediction, planning); every other skill is a fine skill under a parent.
Skill ids are positions in YAML order (`Taxonomy.names`), the ids the model's `skill_labels` use.

Expert groups (our design: the MoSE paper does not publish how skills map onto experts): for E routed
experts the roots partition 0..E-1 in proportion to `expert_share` (largest remainder, at least one each);
a child gets `num_experts` consecutive experts of its parent's group, siblings spread evenly over that group
(so with more children than experts, siblings share). `Taxonomy.expert_groups(E)` returns the map and
`Taxonomy.config_kwargs(E)` the MoSEConfig arguments built from it.

The text fallback (`classify_text`) labels free text with the skills whose keyword patterns it matches.

The taxonomy is loaded once, at an entry point (`mose skills`, `run_training` from `data.taxonomy`, the demo), with
`load_taxonomy(path or None)` (None: the packaged YAML); every function below them takes the `Taxonomy` object and
never re-reads the YAML.

This module imports nothing from curation, training or eval (nor torch).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

from common.errors import MoseError

SKILL_KEYS = {"parent", "description", "aliases", "keywords", "expert_share", "num_experts", "experts"}
TOP_KEYS = {"skills", "experts"}
EXPERT_KEYS = {"fine_experts", "shared_expert"}


class TaxonomyError(MoseError, ValueError):
    """The taxonomy is malformed. The message names the file, the key and what was expected."""


class UnknownSkillError(MoseError, KeyError):
    """A skill name in data is not in the taxonomy (nor an alias of one)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def default_path() -> Path:
    """The packaged `datasets_cfg/skills.yaml` (data only: nothing of datasets_cfg's code is used)."""
    from importlib.resources import files

    return Path(str(files("datasets_cfg") / "skills.yaml"))


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(name).lower())


@dataclass(frozen=True)
class Skill:
    name: str
    parent: str | None
    description: str = ""
    aliases: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    expert_share: float = 1.0
    num_experts: int | None = None
    experts: tuple[int, ...] | None = None


class Taxonomy:
    """A validated skill tree. Build with `Taxonomy.load()` (packaged YAML), `from_yaml(path)` or `from_dict`."""

    def __init__(self, skills: Iterable[Skill], fine_experts: int = 1, shared_expert: bool = False, source: str = "<taxonomy>"):
        self.source = source
        self.skills: dict[str, Skill] = {}
        for s in skills:
            if s.name in self.skills:
                raise TaxonomyError(f"{source}: skills.{s.name}: defined twice")
            self.skills[s.name] = s
        if isinstance(fine_experts, bool) or not isinstance(fine_experts, int) or fine_experts < 1:
            raise TaxonomyError(f"{source}: experts.fine_experts: expected an integer >= 1, got {fine_experts!r}")
        self.fine_experts = fine_experts
        self.shared_expert = bool(shared_expert)
        self._validate()

    # construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Taxonomy":
        """The taxonomy from a YAML file (default: the packaged datasets_cfg/skills.yaml)."""
        return cls.from_yaml(default_path() if path is None else path)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Taxonomy":
        from common.yaml_file import read_yaml

        data = read_yaml(path, what="taxonomy", expect=object, error=TaxonomyError)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Taxonomy":
        if not isinstance(data, dict) or not isinstance(data.get("skills"), dict) or not data["skills"]:
            raise TaxonomyError(f"{source}: expected a mapping with a non-empty 'skills' mapping at the top level")
        unknown = set(data) - TOP_KEYS
        if unknown:
            raise TaxonomyError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected {sorted(TOP_KEYS)}")
        ex = data.get("experts") or {}
        if not isinstance(ex, dict) or set(ex) - EXPERT_KEYS:
            raise TaxonomyError(f"{source}: experts: expected a mapping with keys from {sorted(EXPERT_KEYS)}, got {ex!r}")
        skills = []
        for name, spec in data["skills"].items():
            where = f"{source}: skills.{name}"
            spec = {} if spec is None else spec
            if not isinstance(spec, dict):
                raise TaxonomyError(f"{where}: expected a mapping of {sorted(SKILL_KEYS)}, got {spec!r}")
            bad = set(spec) - SKILL_KEYS
            if bad:
                raise TaxonomyError(f"{where}: unknown key(s) {sorted(bad)}; expected some of {sorted(SKILL_KEYS)}")
            skills.append(Skill(
                name=str(name),
                parent=None if spec.get("parent") is None else str(spec["parent"]),
                description=str(spec.get("description", "")),
                aliases=tuple(str(a) for a in _list(spec.get("aliases"), f"{where}.aliases")),
                keywords=tuple(str(k) for k in _list(spec.get("keywords"), f"{where}.keywords")),
                expert_share=spec.get("expert_share", 1.0),
                num_experts=spec.get("num_experts"),
                experts=None if spec.get("experts") is None else tuple(_list(spec["experts"], f"{where}.experts")),
            ))
        return cls(skills, fine_experts=ex.get("fine_experts", 1), shared_expert=ex.get("shared_expert", False), source=source)

    def _validate(self) -> None:
        src = self.source
        for s in self.skills.values():
            where = f"{src}: skills.{s.name}"
            if not re.fullmatch(r"[a-z][a-z0-9_]*", s.name):
                raise TaxonomyError(f"{where}: skill names must be lower_snake_case identifiers")
            if s.parent is not None and s.parent not in self.skills:
                raise TaxonomyError(f"{where}.parent: unknown parent {s.parent!r}; known skills: {sorted(self.skills)}")
            if s.parent is None:
                share = s.expert_share
                if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share <= 0:
                    raise TaxonomyError(f"{where}.expert_share: a root needs a positive share of the experts, got {share!r}")
            elif s.expert_share != 1.0:
                raise TaxonomyError(f"{where}.expert_share: only roots take expert_share (use num_experts for a child)")
            if s.num_experts is not None and (isinstance(s.num_experts, bool) or not isinstance(s.num_experts, int) or s.num_experts < 1):
                raise TaxonomyError(f"{where}.num_experts: a skill without experts is not allowed; expected an integer >= 1, got {s.num_experts!r}")
            if s.experts is not None:
                if not s.experts:
                    raise TaxonomyError(f"{where}.experts: a skill without experts is not allowed (empty list)")
                if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in s.experts):
                    raise TaxonomyError(f"{where}.experts: expected non-negative expert indices, got {list(s.experts)}")
                if s.parent is None:
                    raise TaxonomyError(f"{where}.experts: roots partition the experts by expert_share; explicit experts are for children")
            for k in s.keywords:
                try:
                    re.compile(k)
                except re.error as exc:
                    raise TaxonomyError(f"{where}.keywords: {k!r} is not a valid regular expression ({exc})") from None
        # cycles: follow parents from every skill
        for s in self.skills.values():
            seen = [s.name]
            p = s.parent
            while p is not None:
                if p in seen:
                    cycle = " -> ".join(seen[seen.index(p):] + [p])
                    raise TaxonomyError(f"{src}: skills.{s.name}.parent: cycle in the skill tree: {cycle}")
                seen.append(p)
                p = self.skills[p].parent
        # aliases must be unambiguous
        owner: dict[str, str] = {}
        for s in self.skills.values():
            for a in (s.name, *s.aliases):
                key = _norm(a)
                if key in owner and owner[key] != s.name:
                    raise TaxonomyError(f"{src}: skills.{s.name}.aliases: {a!r} already names skill {owner[key]!r}")
                owner[key] = s.name
        self._alias = owner

    # structure ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """All skills in YAML order; a skill's id is its position here."""
        return list(self.skills)

    def __len__(self) -> int:
        return len(self.skills)

    def __contains__(self, name: str) -> bool:
        return name in self.skills

    def id(self, name: str) -> int:
        return self._ids[self.resolve(name)]

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.skills)}

    @property
    def roots(self) -> list[str]:
        return [n for n, s in self.skills.items() if s.parent is None]

    def parent(self, name: str) -> str | None:
        return self.skills[name].parent

    def children(self, name: str) -> list[str]:
        return [n for n, s in self.skills.items() if s.parent == name]

    def descendants(self, name: str) -> list[str]:
        out = []
        for c in self.children(name):
            out += [c, *self.descendants(c)]
        return out

    def root_of(self, name: str) -> str:
        """The coarse (level-1) skill above `name` (itself for a root)."""
        while self.skills[name].parent is not None:
            name = self.skills[name].parent
        return name

    def depth(self, name: str) -> int:
        return 0 if self.skills[name].parent is None else 1 + self.depth(self.skills[name].parent)

    @property
    def leaves(self) -> list[str]:
        return [n for n in self.skills if not self.children(n)]

    def resolve(self, name: str, where: str = "") -> str:
        """The canonical skill for a name or alias (case, spaces, '-' and '_' ignored); UnknownSkillError otherwise."""
        if name in self.skills:
            return name
        hit = self._alias.get(_norm(name))
        if hit is None:
            at = f"{where}: " if where else ""
            raise UnknownSkillError(f"{at}unknown skill {name!r}; known skills: {self.names} (or their aliases, see {self.source})")
        return hit

    def try_resolve(self, name: str) -> str | None:
        return self._alias.get(_norm(name)) if name not in self.skills else name

    # text fallback --------------------------------------------------------------------------
    @cached_property
    def _patterns(self) -> dict[str, re.Pattern]:
        return {n: re.compile(r"\b(?:" + "|".join(s.keywords) + r")\b", re.IGNORECASE) for n, s in self.skills.items() if s.keywords}

    def keyword_hits(self, text: str, candidates: Iterable[str] | None = None) -> dict[str, int]:
        """Number of keyword matches in `text` per candidate skill (default: all skills); zero counts omitted."""
        out = {}
        for n in self.names if candidates is None else candidates:
            pat = self._patterns.get(n)
            k = len(pat.findall(text)) if pat is not None else 0
            if k:
                out[n] = k
        return out

    def classify_text(self, text: str, within: str | None = None) -> str | None:
        """The fine skill the text is most about, among the leaves under `within` (default: all leaves).

        Ties go to the skill listed first in the YAML; None when no keyword matches.
        """
        cands = [n for n in (self.descendants(within) if within else self.names) if n in self.leaves]
        hits = self.keyword_hits(text, cands)
        return max(hits, key=lambda n: (hits[n], -self._ids[n])) if hits else None

    def classify_coarse(self, text: str) -> str | None:
        """The root whose own and descendants' keywords match `text` most often (None if none match)."""
        hits = self.keyword_hits(text)
        score = {r: sum(v for n, v in hits.items() if self.root_of(n) == r) for r in self.roots}
        best = max(score, key=lambda r: (score[r], -self._ids[r]))
        return best if score[best] else None

    # experts --------------------------------------------------------------------------------
    def expert_groups(self, num_experts: int) -> dict[str, list[int]]:
        """Skill -> sorted routed-expert indices, for `num_experts` routed experts (every skill, YAML order)."""
        roots = self.roots
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < len(roots):
            raise TaxonomyError(
                f"{self.source}: {len(roots)} root skills {roots} need at least {len(roots)} routed experts, "
                f"got num_experts={num_experts!r}: some skills would have no experts")
        sizes = _apportion([float(self.skills[r].expert_share) for r in roots], num_experts)
        groups: dict[str, list[int]] = {}
        start = 0
        for r, k in zip(roots, sizes):
            groups[r] = list(range(start, start + k))
            start += k
        todo = list(roots)
        while todo:
            parent = todo.pop(0)
            kids = self.children(parent)
            g = groups[parent]
            for i, c in enumerate(kids):
                s = self.skills[c]
                if s.experts is not None:
                    if not set(s.experts) <= set(g):
                        raise TaxonomyError(
                            f"{self.source}: skills.{c}.experts: {list(s.experts)} must lie inside the parent "
                            f"{parent!r}'s group {g} (num_experts={num_experts})")
                    groups[c] = sorted(set(s.experts))
                else:
                    m = min(s.num_experts or self.fine_experts, len(g))  # a child never has more than its parent
                    first = (i * len(g)) // len(kids)
                    groups[c] = sorted({g[(first + j) % len(g)] for j in range(m)})
                todo.append(c)
        return {n: groups[n] for n in self.names}

    def config_kwargs(self, num_experts: int) -> dict:
        """MoSEConfig arguments for `num_experts` routed experts: `num_experts`, `skill_groups` (every skill, in id
        order, so skill id i is the i-th key), `skill_parents` (each non-root skill -> its coarse root, the level
        the model's hierarchical loss uses) and `shared_expert`."""
        return {
            "num_experts": num_experts,
            "skill_groups": self.expert_groups(num_experts),
            "skill_parents": {n: self.root_of(n) for n in self.names if self.parent(n) is not None},
            "shared_expert": self.shared_expert,
        }

    def describe(self) -> str:
        """An indented tree, one skill per line, for logs and reports."""
        lines = []

        def walk(n: str, d: int) -> None:
            lines.append(f"{'  ' * d}{n}: {self.skills[n].description}")
            for c in self.children(n):
                walk(c, d + 1)

        for r in self.roots:
            walk(r, 0)
        return "\n".join(lines)


def _list(v: Any, where: str) -> list:
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        raise TaxonomyError(f"{where}: expected a list, got {v!r}")
    return list(v)


def _apportion(weights: list[float], total: int) -> list[int]:
    """Integers >= 1 summing to `total`, proportional to `weights` (largest remainder)."""
    quota = [total * w / sum(weights) for w in weights]
    out = [max(1, math.floor(q)) for q in quota]
    while sum(out) > total:  # the max(1, .) floors overshot: take from the most over-served
        i = max((i for i in range(len(out)) if out[i] > 1), key=lambda i: out[i] - quota[i])
        out[i] -= 1
    while sum(out) < total:
        i = max(range(len(out)), key=lambda i: quota[i] - out[i])
        out[i] += 1
    return out


def load_taxonomy(path: str | os.PathLike | Mapping | None = None) -> Taxonomy:
    """A Taxonomy from a path, a dict, or None (the packaged YAML); passes a Taxonomy through."""
    if isinstance(path, Taxonomy):
        return path
    if isinstance(path, Mapping):
        return Taxonomy.from_dict(dict(path))
    return Taxonomy.load(path)
