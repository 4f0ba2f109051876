"""The hierarchical skill dataset as a file a person can open: items JSONL + a small JSON header with a fingerprint.

    <name>.jsonl                     one item per line, exactly what datasets_cfg/skill_items.py builds:
                                     {item_id, scene_id, kind, task, prompt, target, spans: [{start, end, skill}],
                                      images: [path], box: [x, y, w, h], skills: [fine skills]}
                                     (`target[start:end]` is the text of each span's skill)
    <name>.header.json               {format, version, fingerprint, inputs, num_items, items_file, items_sha256,
                                      report (the ItemReport: counts, skips), created}

The fingerprint is the SHA-256 of the canonical JSON of `inputs` (`item_inputs`): the pool's identity (its root
directory, which the items' image paths name, and a hash of the selected scenes' rows), a hash of the scene ids in
order (a stage's manifest rows), a hash of the taxonomy's content (every skill's fields, not its file name), the item
options (max_images, kinds, on_unknown) and the item builder's code version (a hash of the source of the modules
that build items). Equal fingerprints mean the items would be built the same again.

Where the files live: training writes one per stage beside the stage outputs, `<run.output_dir>/skill_items/
<stage>.jsonl` (training/data.py), and reads it back instead of re-annotating when its fingerprint matches; the
demo's skills step writes the whole training pool's items to `<run>/skills/items.jsonl` in this format.

Both files are written atomically (common.atomic), the items first and the header last, so a header always names
complete items. `read_skill_dataset` checks the header, every line (JSON, the item keys, spans inside the target),
the item count and the checksum, and raises `SkillDatasetError` naming the file (and line); `cached_skill_items`
(what training calls) rebuilds a missing, stale or unreadable file and says which it did.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from common.atomic import write_json, write_jsonl
from common.errors import MoseError
from mose.skills import Taxonomy

FORMAT = "mose-skill-items"
FORMAT_VERSION = 1
ITEM_KEYS = ("item_id", "scene_id", "kind", "task", "prompt", "target", "spans", "images", "box", "skills")
# the modules whose code decides what an item holds (a change to any of them makes every file stale)
BUILDER_MODULES = ("datasets_cfg.skill_items", "datasets_cfg.skill_annotation", "datasets_cfg.schema", "mose.skill_format",
                   "mose.skills", "common.geometry", __name__)


class SkillDatasetError(MoseError, ValueError):
    """A skill-dataset file can not be read: the message names the file (and the line) and what is wrong."""


@dataclass
class SkillDataset:
    path: Path
    header: dict
    items: list[dict]

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]

    def __len__(self) -> int:
        return len(self.items)


def header_path(path: str | os.PathLike) -> Path:
    """`<stem>.header.json` next to the items file `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.header.json")


# ----------------------------------------------------------------------------------------------
# fingerprint


def builder_version() -> str:
    """A hash of the source of the modules that build items (BUILDER_MODULES)."""
    from importlib.util import find_spec

    h = hashlib.sha256()
    for name in BUILDER_MODULES:
        h.update(name.encode() + b"\0" + Path(find_spec(name).origin).read_bytes())
    return h.hexdigest()[:24]


def taxonomy_content(tax: Taxonomy) -> dict:
    """The taxonomy as plain data: every skill's fields in id order and the expert settings (not its file name)."""
    return {"skills": [dataclasses.asdict(s) for s in tax.skills.values()], "fine_experts": tax.fine_experts,
            "shared_expert": tax.shared_expert}


def pool_rows_sha256(pool) -> str:
    """A hash of the pool's rows (every column, in row order), of their Arrow buffers (no Python row is built).

    The same pool read the same way hashes the same; equal rows laid out differently in Arrow (e.g. built in
    memory vs. loaded from disk) may not, which costs a rebuild, never the reuse of stale items."""
    ds = pool.dataset.with_format("arrow")
    h = hashlib.sha256(str(ds.features).encode())
    for start in range(0, len(ds), 256):  # batch by batch: the selection is never held whole
        for batch in ds[start:start + 256].combine_chunks().to_batches():
            h.update(batch.serialize())
    return h.hexdigest()


def item_inputs(pool, taxonomy: Taxonomy, *, ids: Sequence[str] | None = None, max_images: int = 1,
                kinds: Sequence[str] = ("hierarchical", "single"), on_unknown: str = "count") -> dict:
    """What the items of `pool` (its scenes `ids` in this order, default all) depend on: the fingerprint's inputs.

    `pool` is the whole pool; the selected scenes' rows are hashed (so an edited pool or a manifest naming other
    scenes, or the same scenes in another order, gives other inputs)."""
    ids = list(pool.ids if ids is None else ids)
    chosen = pool if ids == pool.ids else pool.select_ids(ids)
    return {
        "pool": {"root": str(Path(pool.root).resolve()) if pool.root is not None else None,
                 "selected_rows_sha256": pool_rows_sha256(chosen)},
        "scene_ids": {"count": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()},
        "taxonomy": hashlib.sha256(json.dumps(taxonomy_content(taxonomy), sort_keys=True).encode()).hexdigest(),
        "options": {"max_images": int(max_images), "kinds": list(kinds), "on_unknown": on_unknown},
        "builder": builder_version(),
        "format_version": FORMAT_VERSION,
    }


def fingerprint(inputs: dict) -> str:
    """SHA-256 of the canonical JSON of `inputs` (keys sorted)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# write / read


def write_skill_dataset(path: str | os.PathLike, items: Iterable[dict], fingerprint_inputs: dict, report: dict | None = None) -> Path:
    """Write the items (JSONL) then the header, each atomically. Returns the items path."""
    path = Path(path)
    rows = [{k: it[k] for k in ITEM_KEYS} for it in items]
    write_jsonl(path, rows)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint(fingerprint_inputs),
              "num_items": len(rows), "items_file": path.name, "items_sha256": _sha256(path.read_bytes()),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "report": report or {},
              "inputs": fingerprint_inputs}
    write_json(header_path(path), header)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The header of the items file `path` (format and version checked). FileNotFoundError if absent."""
    hp = header_path(path)
    if not hp.is_file():
        raise FileNotFoundError(f"{hp}: skill-dataset header missing (expected next to {path})")
    try:
        header = json.loads(hp.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SkillDatasetError(f"{hp}: not a JSON skill-dataset header ({exc})") from None
    if not isinstance(header, dict):
        raise SkillDatasetError(f"{hp}: expected a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise SkillDatasetError(f"{hp}: field 'format': expected {FORMAT!r}, got {header.get('format')!r}")
    if header.get("version") != FORMAT_VERSION:
        raise SkillDatasetError(f"{hp}: field 'version': expected {FORMAT_VERSION}, got {header.get('version')!r}")
    for key in ("fingerprint", "num_items", "items_sha256"):
        if key not in header:
            raise SkillDatasetError(f"{hp}: field {key!r} missing")
    return header


def read_skill_dataset(path: str | os.PathLike) -> SkillDataset:
    """Read and check an items file and its header. Raises SkillDatasetError naming the file and line."""
    path = Path(path)
    header = read_header(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: skill-dataset items missing (named by {header_path(path)})")
    data = path.read_bytes()
    items = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            it = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SkillDatasetError(f"{where}: not a JSON item ({exc}); the file is truncated or was edited") from None
        items.append(_check_item(it, where))
    if len(items) != header["num_items"]:
        raise SkillDatasetError(f"{path}: expected {header['num_items']} items (field 'num_items' of {header_path(path)}), got {len(items)}; "
                                "the file is truncated or was edited")
    if _sha256(data) != header["items_sha256"]:
        raise SkillDatasetError(f"{path}: checksum does not match field 'items_sha256' of {header_path(path)}; the file was edited "
                                "or belongs to another header")
    return SkillDataset(path, header, items)


def _check_item(it: Any, where: str) -> dict:
    if not isinstance(it, dict):
        raise SkillDatasetError(f"{where}: expected a JSON object, got {type(it).__name__}")
    missing = [k for k in ITEM_KEYS if k not in it]
    if missing:
        raise SkillDatasetError(f"{where}: field(s) {missing} missing; an item has {list(ITEM_KEYS)}")
    target = it["target"]
    if not isinstance(target, str) or not isinstance(it["spans"], list):
        raise SkillDatasetError(f"{where}: fields 'target' and 'spans': expected a string and a list")
    for sp in it["spans"]:
        ok = isinstance(sp, dict) and isinstance(sp.get("skill"), str) and all(isinstance(sp.get(k), int) for k in ("start", "end"))
        if not ok or not 0 <= sp["start"] <= sp["end"] <= len(target):
            raise SkillDatasetError(f"{where}: field 'spans': {sp!r} is not a span {{start, end, skill}} inside the target "
                                    f"({len(target)} characters)")
    return it


def item_features():
    """The `datasets.Features` of an item (the same whatever the items hold, e.g. no box at all)."""
    from datasets import Features, List, Value

    text = {k: Value("string") for k in ("item_id", "scene_id", "kind", "task", "prompt", "target")}
    return Features({**text, "spans": List({"start": Value("int64"), "end": Value("int64"), "skill": Value("string")}),
                     "images": List(Value("string")), "box": List(Value("float64")), "skills": List(Value("string"))})


def items_dataset(items: Iterable[dict]):
    """Items (read from a file or just built) as a `datasets.Dataset` with `item_features()` (columns in ITEM_KEYS order)."""
    from datasets import Dataset

    return Dataset.from_list([{k: it[k] for k in ITEM_KEYS} for it in items], features=item_features())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# reuse or build


def cached_skill_items(path: str | os.PathLike, inputs: dict, build: Callable[[], tuple[Iterable[dict], dict]]) -> tuple[list[dict], dict, dict]:
    """The items of `path` when its fingerprint equals `fingerprint(inputs)`, else `build()` -> (items, report),
    written to `path`. -> (items, report, status) with status {"file", "fingerprint", "status": "reused" | "built" |
    "rebuilt", "why"} ("why": missing / stale / the read error)."""
    path = Path(path)
    want = fingerprint(inputs)
    why = "missing"
    try:
        header = read_header(path)
        if header["fingerprint"] != want:
            why = "stale: its inputs changed (" + ", ".join(_changed(header.get("inputs") or {}, inputs)) + ")"
        else:
            ds = read_skill_dataset(path)
            return ds.items, ds.header.get("report") or {}, {"file": str(path), "fingerprint": want, "status": "reused", "why": ""}
    except FileNotFoundError:
        why = "missing"
    except SkillDatasetError as exc:
        why = f"unreadable: {exc}"
    items, report = build()
    items = [{k: it[k] for k in ITEM_KEYS} for it in items]
    write_skill_dataset(path, items, inputs, report)
    return items, report, {"file": str(path), "fingerprint": want, "status": "built" if why == "missing" else "rebuilt", "why": why}


def _changed(old: dict, new: dict) -> list[str]:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return keys or ["fingerprint"]


__all__ = ["SkillDataset", "SkillDatasetError", "write_skill_dataset", "read_skill_dataset", "read_header", "item_inputs",
           "fingerprint", "cached_skill_items", "items_dataset", "item_features", "header_path", "builder_version", "taxonomy_content",
           "FORMAT", "FORMAT_VERSION"]
