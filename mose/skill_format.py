"""The single-turn, step-by-step answer format of the hierarchical skill dataset, and its parser.

One answer covers the three coarse steps in order, each inside its own tag, one fine skill per line::

    <perception>
    [vehicles] A white van is parked 12 m ahead in the right lane.
    [scene_conditions] Daytime, clear weather, a straight two-lane road.
    </perception>
    <prediction>
    [agent_intent] The van is stationary and will stay parked.
    [interaction_risk] Low risk: the van is outside the ego lane.
    </prediction>
    <planning>
    [longitudinal_control] Keep the speed at about 8 m/s.
    [lateral_control] Keep the current lane.
    [trajectory] [(4.01, 0.00), (8.02, 0.01), (12.03, 0.01), (16.04, 0.02), (20.05, 0.02), (24.06, 0.03), (28.07, 0.03), (32.08, 0.04)]
    </planning>

- Coarse tags are the taxonomy's roots (`<name>` ... `</name>`), written in taxonomy order; a step with nothing
  to say is left out. Fine lines start with `[skill] `; a line without a tag is coarse-level text.
- The trajectory line lists 8 future ego poses 0.5 s apart, `(x, y)` in metres in the current ego frame
  (x forward, y left), two decimals. The parser also accepts `(x, y, heading)` triples and a
  `trajectory: [...]` line without the fine tag.
- `render_target` returns the text and character spans (start, end, skill) that cover it completely: a coarse
  tag line belongs to its root, a fine line (tag, text and newline) to its skill. The per-token skill labels
  (mose/skill_data.py) come from these spans.

The tags and the layout are our design (the MoSE paper only says the steps run in one forward pass).
`parse_answer` never raises on model output: malformed text gives a `ParsedAnswer` with `errors` listed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mose.skills import Taxonomy

TRAJECTORY_SKILL = "trajectory"
NUM_POSES = 8
POSE_INTERVAL_S = 0.5

_TAG = re.compile(r"<(/?)([A-Za-z_][A-Za-z0-9_]*)>")
_FINE = re.compile(r"^\s*\[([^\]\n]{1,64})\]\s?")
_TUPLE = re.compile(r"\(([^()]*)\)?")
_LIST = re.compile(r"\[\s*\(")


@dataclass(frozen=True)
class Segment:
    """One piece of an answer: its skill (a taxonomy name) and its text (no tag, no newline)."""

    skill: str
    text: str


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of a rendered target that belong to `skill`."""

    start: int
    end: int
    skill: str


def format_trajectory(xy: Sequence[Sequence[float]]) -> str:
    """`[(x1, y1), ...]` with two decimals (ego frame, metres)."""
    return "[" + ", ".join(f"({float(p[0]):.2f}, {float(p[1]):.2f})" for p in xy) + "]"


def render_target(segments: Sequence[Segment], taxonomy: Taxonomy) -> tuple[str, list[Span]]:
    """The tagged answer for `segments` and the spans covering every character of it.

    Segments are grouped under their root in taxonomy order, keeping their order within a root. Newlines
    inside a segment's text are replaced by spaces (one fine skill per line is what the parser reads).
    """
    tax = taxonomy
    by_root: dict[str, list[Segment]] = {r: [] for r in tax.roots}
    for seg in segments:
        skill = tax.resolve(seg.skill, "render_target")
        by_root[tax.root_of(skill)].append(Segment(skill, " ".join(seg.text.split())))
    text, spans = "", []

    def add(piece: str, skill: str) -> None:
        nonlocal text
        spans.append(Span(len(text), len(text) + len(piece), skill))
        text += piece

    for root, segs in by_root.items():
        if not segs:
            continue
        add(f"<{root}>\n", root)
        for seg in segs:
            add(seg.text + "\n" if seg.skill == root else f"[{seg.skill}] {seg.text}\n", seg.skill)
        add(f"</{root}>\n", root)
    if text:  # no trailing newline after the last closing tag: the end-of-turn token follows
        text = text[:-1]
        spans[-1] = Span(spans[-1].start, spans[-1].end - 1, spans[-1].skill)
    return text, spans


# ----------------------------------------------------------------------------------------------
# parser


@dataclass
class ParsedAnswer:
    """What `parse_answer` read: segments in order, the text of each coarse section, the trajectory, problems."""

    segments: list[Segment] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)
    trajectory: np.ndarray | None = None  # (n, 2) x, y in metres, ego frame; n may be < 8 (see errors)
    headings: np.ndarray | None = None  # (n,) rad, only when every pose had a heading
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self, skill: str) -> str:
        """All text labelled `skill`, joined by spaces ("" if none)."""
        return " ".join(s.text for s in self.segments if s.skill == skill)

    @property
    def trajectory_complete(self) -> bool:
        return self.trajectory is not None and len(self.trajectory) == NUM_POSES


def parse_answer(answer, taxonomy: Taxonomy, num_poses: int = NUM_POSES) -> ParsedAnswer:
    """Read a generated answer back into segments, sections and a trajectory. Never raises on model output.

    Tolerated and reported in `errors`: text outside any section, a missing or unexpected closing tag, an
    unknown tag or skill, a fine skill under the wrong step, a missing step, a missing, truncated or
    over-long trajectory, and numbers that do not parse or are not finite.
    """
    tax = taxonomy
    out = ParsedAnswer()
    if not isinstance(answer, str):
        out.errors.append(f"answer is a {type(answer).__name__}, not a string")
        return out
    roots = tax.roots
    pieces: list[tuple[str | None, str]] = []  # (root or None outside sections, body text)
    current, pos = None, 0
    for m in _TAG.finditer(answer):
        closing, name = m.group(1) == "/", m.group(2)
        if name not in roots:
            out.errors.append(f"unknown tag <{m.group(1)}{name}> at character {m.start()}")
            continue  # left in the body as text
        pieces.append((current, answer[pos:m.start()]))
        pos = m.end()
        if closing:
            if current != name:
                out.errors.append(f"closing tag </{name}> at character {m.start()} without an open <{name}>")
            current = None
        else:
            if current is not None:
                out.errors.append(f"<{current}> is not closed before <{name}>")
            if name in out.sections:
                out.errors.append(f"step <{name}> appears more than once")
            out.sections.setdefault(name, "")
            current = name
    pieces.append((current, answer[pos:]))
    if current is not None:
        out.errors.append(f"<{current}> is not closed (answer truncated?)")

    traj_text = None
    for root, body in pieces:
        if root is None:
            if body.strip():
                out.errors.append(f"text outside any step: {_clip(body)!r}")
            continue
        out.sections[root] = (out.sections[root] + "\n" + body.strip()).strip()
        for skill, text in _fine_lines(body, root, tax, out.errors):
            out.segments.append(Segment(skill, text))
            if skill == TRAJECTORY_SKILL:
                traj_text = text if traj_text is None else traj_text
    order = [r for r in roots if r in out.sections]
    seen = list(dict.fromkeys(r for r, _ in pieces if r is not None))
    if seen != order:
        out.errors.append(f"steps out of order: {seen}, expected {order}")
    for r in roots:
        if r not in out.sections:
            out.errors.append(f"missing step <{r}>")

    if traj_text is None:  # accept an untagged "trajectory: [...]" anywhere
        m = re.search(r"trajectory\s*:\s*(\[.*)", answer, re.IGNORECASE)
        traj_text = m.group(1) if m else None
    if traj_text is None:
        out.errors.append("no trajectory")
    else:
        _read_trajectory(traj_text, num_poses, out)
    return out


def _fine_lines(body: str, root: str, tax: Taxonomy, errors: list[str]) -> list[tuple[str, str]]:
    segs: list[tuple[str, list[str]]] = []
    for line in body.split("\n"):
        m = _FINE.match(line)
        if m:
            name = m.group(1).strip()
            skill = tax.try_resolve(name)
            if skill is None:
                errors.append(f"unknown skill [{name}] in <{root}>")
                skill = root
            elif tax.root_of(skill) != root:
                errors.append(f"skill [{skill}] belongs to <{tax.root_of(skill)}>, found in <{root}>")
            segs.append((skill, [line[m.end():]]))
        elif line.strip():
            if segs:
                segs[-1][1].append(line)
            else:
                segs.append((root, [line]))
    return [(s, " ".join(" ".join(lines).split())) for s, lines in segs]


def _read_trajectory(text: str, num_poses: int, out: ParsedAnswer) -> None:
    out.trajectory, out.headings, errors = parse_trajectory(text, num_poses)
    out.errors += errors


def parse_trajectory(text: str, num_poses: int = NUM_POSES) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """`[(x, y), ...]` (or `(x, y, heading)` triples) -> ((n, 2) positions, (n,) headings or None, errors).

    Reads at most `num_poses` poses; unreadable poses are skipped and reported, a truncated pose ends the list.
    Text before the list (`[(`) is ignored, so prose such as "Waypoints (x, y) in metres: [...]" reads too.
    """
    poses, headings, errors = [], [], []
    text = text if isinstance(text, str) else ""
    start = _LIST.search(text)
    for k, m in enumerate(_TUPLE.finditer(text, start.start() if start else 0)):
        if m.group(0)[-1] != ")":
            errors.append(f"trajectory pose {k + 1} is truncated: {_clip(m.group(0))!r}")
            break
        parts = [p.strip() for p in m.group(1).split(",")]
        if len(parts) not in (2, 3):
            errors.append(f"trajectory pose {k + 1} has {len(parts)} numbers, expected 2 (x, y) or 3 (x, y, heading)")
            continue
        vals = []
        for p in parts:
            try:
                v = float(p)
            except ValueError:
                v = None
            if v is None or not math.isfinite(v):
                errors.append(f"trajectory pose {k + 1}: {_clip(p)!r} is not a finite number")
                break
            vals.append(v)
        else:
            poses.append(vals[:2])
            headings.append(vals[2] if len(vals) == 3 else None)
    if not poses:
        return None, None, errors + ["trajectory has no readable pose"]
    if len(poses) != num_poses:
        errors.append(f"trajectory has {len(poses)} readable poses, expected {num_poses}")
    xy = np.asarray(poses[:num_poses], dtype=np.float64)
    hd = np.asarray(headings[:num_poses], dtype=np.float64) if all(h is not None for h in headings) else None
    return xy, hd, errors


def _clip(s: str, n: int = 60) -> str:
    s = s.strip()
    return s if len(s) <= n else s[: n - 3] + "..."
