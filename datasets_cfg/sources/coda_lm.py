"""CODA-LM annotations -> ScenePool rows (one row per image, its QA in `row["qa"]`).

Layout of a CODA-LM download (see the official README)::

    ROOT/val/images/XXXX.jpg          # CODA2022 val images (used by CODA-LM Train)
    ROOT/test/images/XXXX.jpg         # CODA2022 test images (used by Val, Test, Mini)
    ROOT/CODA-LM/{Train,Val,Test,Mini}/{val,test}_XXXX.json

The file name encodes the image: ``val_XXXX.json`` -> ``val/images/XXXX.jpg`` and ``test_XXXX.json`` ->
``test/images/XXXX.jpg``, both relative to the image root. One annotation file holds

- ``general_perception``: seven category lists (``vehicles``, ``vulnerable_road_users``, ``traffic signs``,
  ``traffic lights``, ``traffic cones``, ``barriers``, ``other objects``; spaces and underscores mixed) of
  ``{description, explanation}``, plus an optional summary string ``description and explanation``;
- ``region_perception``: ``{"1": {"description and explanation", "box": [x, y, w, h], "category_name"}, ...}``;
- ``driving_suggestion``: one string.

What a row carries (dataset "coda_lm", source "real", no ego / agents / map):

- ``id``: the annotation file stem (``test_0010``); ``images``: one front image, absolute path under the image
  root; ``meta``: log_name (= id), timestamp_s 0.0, annotation file, image size [w, h] in pixels.
- ``qa`` (qid, task, category, box):
  ``{id}:general`` / "general" / "" / [] — the scene-level question; answer = the summary (or, where an older
  file has no summary, every object's description and explanation joined in category order);
  ``{id}:general:{category}:{k}`` / "general_object" / the official category key / [] — one per annotated
  object; answer = "description explanation" (these are annotations, the question text is empty);
  ``{id}:region:{key}`` / "region" / category_name / [x, y, w, h] pixels from the top-left;
  ``{id}:suggestion`` / "suggestion" / "" / [].

Also read: question lists in LLaVA conversation format (a JSON list or JSONL of ``{"id", "image",
"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}``) or the official ``vqa_anno`` JSONL
(``{"question_id", "image", "question", "answer"}``). The task comes from the file name or record id
(general / region(al) / suggestion) or, failing that, from the image path (``images_w_boxes/..._object_K``
is a region question). Region boxes are drawn into those images, so such rows keep the boxed image as an extra
image entry (camera ``front_box:K``) and an empty ``box``.

Two modes for the per-image files. Default (lenient): what the evaluation reads must be right (the general
summary, each region's description, category and a finite [x, y, w, h], the driving suggestion; valid JSON, a
file name that encodes the image); the rest is reported as a warning (counted by reason in the import report)
and read anyway (a missing image, a box reaching outside the image, a key given twice: the last one, as
``json.load`` keeps it) or left out (an unknown general-perception key, a malformed general object).
``--strict``: every one of those is an error. An error (malformed JSON, a missing field, a wrong type, a path
escaping the image root, ...) raises `CodaFormatError` naming the file, the field and what was expected; with
``skip_invalid`` the file (or record) is skipped and counted by reason instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import MoseError
from datasets_cfg.schema import SchemaError, new_row

# official general-perception keys, in the official order (normalised: lower case, "_" -> " ")
GENERAL_CATEGORIES = ("vehicles", "vulnerable road users", "traffic signs", "traffic lights", "traffic cones", "barriers", "other objects")
SUMMARY_KEY = "description and explanation"
CAMERA = "front"
BOX_TOLERANCE_PX = 1.0  # boxes may overhang the image by rounding; more than this is an error

# Our own questions, written to the official criteria (seven categories, nothing else, appearance /
# position / direction / why it matters). eval/coda_prompts.py can swap in the official texts.
QUESTIONS = {
    "general": (
        "This image is taken from the ego car's front camera. Describe the objects that influence how the ego car "
        "should drive, in these seven categories only: vehicles (cars, trucks, buses, ...), vulnerable road users "
        "(pedestrians, cyclists, motorcyclists, ...), traffic signs, traffic lights, traffic cones, barriers, and "
        "miscellaneous objects (debris, dustbins, animals, ...). Do not mention objects outside these categories. "
        "For each object give its appearance, position and direction, and explain why it affects the ego car."
    ),
    "region": "Describe the object inside the red rectangle in the image and explain why it affects the ego car's driving.",
    "region_text": (
        "Describe the object in the box {box} (normalised <x1, y1, x2, y2> image coordinates) and explain why it "
        "affects the ego car's driving."
    ),
    "suggestion": (
        "This image is taken from the ego car's front camera. Considering the vehicles, vulnerable road users, "
        "traffic signs, traffic lights, traffic cones, barriers and miscellaneous objects that matter here, give "
        "specific, actionable driving suggestions for the ego car in this scene."
    ),
}

_NAME = re.compile(r"^(val|test)_(.+)\.json$")


class CodaFormatError(SchemaError):
    """A CODA-LM file does not fit the format; `kind` is the short reason used in skip summaries."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


def _fail(where: Any, field_: str, expected: str, got: Any, kind: str = "wrong type") -> CodaFormatError:
    got_s = "missing" if got is _MISSING else repr(got)
    if len(got_s) > 120:
        got_s = got_s[:117] + "..."
    return CodaFormatError(f"{where}: field '{field_}': expected {expected}, got {got_s}", kind)


_MISSING = object()


@dataclass
class ImportReport:
    """What an import read, kept and skipped (by reason), for the printed summary."""

    files: int = 0
    scenes: int = 0
    questions: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)
    warnings: Counter = field(default_factory=Counter)  # lenient mode: what was read anyway, or left out, by reason
    warning_texts: list = field(default_factory=list)
    strict: bool = False

    def warn(self, err: "CodaFormatError") -> None:
        self.warnings[err.kind] += 1
        self.warning_texts.append(str(err))

    def as_dict(self) -> dict:
        return {"mode": "strict" if self.strict else "lenient", "files": self.files, "scenes": self.scenes, "questions": dict(self.questions),
                "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped), "first_errors": self.errors[:20],
                "warnings": sum(self.warnings.values()), "warnings_by_reason": dict(self.warnings), "first_warnings": self.warning_texts[:20]}


# ----------------------------------------------------------------------------------------------
# small validated readers


def _load_json(path: Path, warn=None) -> Any:
    """The JSON of `path`; a key given twice in one object is an error, or, with `warn` (lenient mode), reported
    and the last value kept, as Python's json.load keeps it (what the official scripts read)."""
    def no_dup(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                err = _fail(path, k, "unique keys in every JSON object (unique question ids)", f"{k!r} twice", "duplicate id")
                if warn is None:
                    raise err
                warn(err)
            seen[k] = v
        return seen

    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_dup)
    except UnicodeDecodeError as e:
        raise CodaFormatError(f"{path}: expected UTF-8 JSON text, got undecodable bytes ({e.reason})", "malformed JSON") from None
    except json.JSONDecodeError as e:
        raise CodaFormatError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", "malformed JSON") from None


def _get(obj: dict, key: str, where: Any, path: str, typ: type | tuple, expected: str) -> Any:
    if not isinstance(obj, dict):
        raise _fail(where, path.rsplit(".", 1)[0] if "." in path else path, "a JSON object", obj)
    v = obj.get(key, _MISSING)
    if v is _MISSING:
        raise _fail(where, path, expected, v, "missing field")
    if not isinstance(v, typ):
        raise _fail(where, path, expected, v)
    return v


def resolve_image(root: Path, rel: str, where: Any, field_: str = "image") -> Path:
    """`rel` joined to `root`; refuses absolute paths and paths that leave `root` (checked on the path text,
    so symlinks inside the root are allowed); raises if the file is missing."""
    if not rel or os.path.isabs(rel) or re.match(r"^[A-Za-z]:", rel):
        raise _fail(where, field_, f"a path relative to the image root {root}", rel, "path escapes image root")
    root_n = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(root_n, rel))
    if os.path.commonpath([root_n, full]) != root_n:
        raise _fail(where, field_, f"a path inside the image root {root}", rel, "path escapes image root")
    if not os.path.isfile(full):
        raise _fail(where, field_, f"an existing image file ({full})", rel, "missing image")
    return Path(full)


def image_size(path: Path, where: Any) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise _fail(where, "image", "a readable image file", f"{path} ({type(e).__name__})", "unreadable image") from None


def check_box(box: Any, size: tuple[int, int] | None, where: Any, field_: str, warn=None) -> list[float]:
    """A finite [x, y, w, h] (pixels, top-left origin, w, h > 0) that lies inside the image (± 1 px).

    With `warn` (lenient mode) a box reaching outside the image is reported and kept as given (the official
    evaluation never checks it; a rectangle drawn on the image shows its visible part); `size` None (image
    missing in lenient mode) skips that check."""
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise _fail(where, field_, "[x, y, w, h]: a list of 4 numbers (pixels)", box)
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise _fail(where, field_, "finite [x, y, w, h] with w > 0 and h > 0", box, "bad box")
    if size is None:
        return [x, y, w, h]
    W, H = size
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + w > W + t or y + h > H + t:
        err = _fail(where, field_, f"a box inside the {W}x{H} image", box, "box outside image")
        if warn is None:
            raise err
        warn(err)
    return [x, y, w, h]


def _qa(qid: str, task: str, question: str, answer: str, category: str = "", box: list | None = None) -> dict:
    return {"qid": qid, "task": task, "question": question, "answer": answer, "category": category, "box": box or [], "skills": []}


def _norm_category(key: str) -> str:
    return " ".join(key.lower().replace("_", " ").split())


# ----------------------------------------------------------------------------------------------
# the official per-image JSON


def image_rel_path(json_name: str) -> str:
    """``val_0001.json`` -> ``val/images/0001.jpg``; ``test_0001.json`` -> ``test/images/0001.jpg``."""
    m = _NAME.match(json_name)
    if not m:
        raise CodaFormatError(f"{json_name}: file name: expected 'val_XXXX.json' or 'test_XXXX.json' (it encodes the image), "
                              f"got {json_name!r}", "bad file name")
    return f"{m.group(1)}/images/{m.group(2)}.jpg"


def read_annotation(path: str | os.PathLike, image_root: str | os.PathLike, split: str, strict: bool = True, warn=None) -> dict:
    """One CODA-LM annotation file -> one ScenePool row. Raises `CodaFormatError`.

    `strict`: every check (module doc). Lenient (`strict=False`, `warn` called with each `CodaFormatError` it
    lets pass): only what the evaluation reads must be right — the general summary (or, without one, the objects
    it is joined from), each region's description, category and a usable [x, y, w, h], the driving suggestion
    (stage1_eval_batch.py:197-198, stage2_eval_batch.py:196, stage3_eval_batch.py:38-47, the box for drawing as
    convert2vqa.py draws it). Reported and read anyway: a missing image (the row keeps its path; boxes are not
    checked against the image), a box reaching outside the image, a key given twice (the last kept). Reported
    and left out: an unknown general-perception key, a general object that is not {description, explanation}."""
    path, image_root = Path(path), Path(image_root)
    if not strict and warn is None:
        raise ValueError("read_annotation: lenient mode needs a warn callback")
    lenient_warn = None if strict else warn
    rel = image_rel_path(path.name)
    data = _load_json(path, lenient_warn)
    if not isinstance(data, dict):
        raise _fail(path, "(top level)", "a JSON object with general_perception, region_perception, driving_suggestion", data)
    scene = path.stem
    try:
        image = resolve_image(image_root, rel, path, f"image ({path.name} encodes {rel})")
        size = image_size(image, path)
    except CodaFormatError as e:
        if strict or e.kind != "missing image":
            raise
        warn(e)
        image, size = Path(os.path.normpath(os.path.join(os.path.abspath(image_root), rel))), None

    def lenient(err: CodaFormatError) -> None:
        if strict:
            raise err
        warn(err)

    gp = _get(data, "general_perception", path, "general_perception", dict, "an object of category lists")
    objects, qa = [], []
    by_cat = {}
    for key, value in gp.items():
        if key == SUMMARY_KEY:
            continue
        cat = _norm_category(key)
        if cat not in GENERAL_CATEGORIES:
            lenient(_fail(path, f"general_perception.{key}", f"one of the category keys {list(GENERAL_CATEGORIES)} or '{SUMMARY_KEY}'", key,
                          "unknown field"))
            continue
        if not isinstance(value, list):
            lenient(_fail(path, f"general_perception.{key}", "a list of {description, explanation}", value))
            continue
        by_cat[cat] = (key, value)
    for cat in GENERAL_CATEGORIES:
        if cat not in by_cat:
            continue  # a category with no objects may be absent
        key, value = by_cat[cat]
        for k, obj in enumerate(value):
            f = f"general_perception.{key}[{k}]"
            try:
                if not isinstance(obj, dict):
                    raise _fail(path, f, "an object {description, explanation}", obj)
                d = _get(obj, "description", path, f"{f}.description", str, "a string")
                e = _get(obj, "explanation", path, f"{f}.explanation", str, "a string")
            except CodaFormatError as err:
                lenient(err)
                continue
            text = f"{d} {e}".strip()
            objects.append(text)
            qa.append(_qa(f"{scene}:general:{key}:{k}", "general_object", "", text, key))
    summary = gp.get(SUMMARY_KEY, _MISSING)
    if summary is not _MISSING and not isinstance(summary, str):
        raise _fail(path, f"general_perception.{SUMMARY_KEY}", "a string", summary)
    general_answer = summary if summary is not _MISSING else " ".join(objects)
    qa.insert(0, _qa(f"{scene}:general", "general", QUESTIONS["general"], general_answer))

    rp = _get(data, "region_perception", path, "region_perception", dict, 'an object {"1": {...}, "2": {...}}')
    for key, obj in rp.items():
        f = f"region_perception.{key}"
        if not isinstance(obj, dict):
            raise _fail(path, f, "an object {description and explanation, box, category_name}", obj)
        text = _get(obj, SUMMARY_KEY, path, f"{f}.{SUMMARY_KEY}", str, "a string")
        cat = _get(obj, "category_name", path, f"{f}.category_name", str, "a string")
        box = check_box(_get(obj, "box", path, f"{f}.box", list, "[x, y, w, h] (pixels)"), size, path, f"{f}.box", lenient_warn)
        qa.append(_qa(f"{scene}:region:{key}", "region", QUESTIONS["region"], text, cat, box))

    sugg = _get(data, "driving_suggestion", path, "driving_suggestion", str, "a string")
    qa.append(_qa(f"{scene}:suggestion", "suggestion", QUESTIONS["suggestion"], sugg))
    meta = {"log_name": scene, "timestamp_s": 0.0, "annotation_file": str(path), "image_size": list(size) if size else None, "format": "coda_lm"}
    return new_row(scene, "coda_lm", split, tags=["corner_case"], images=[{"frame": 0, "camera": CAMERA, "path": str(image)}],
                   qa=qa, meta=json.dumps(meta))


# ----------------------------------------------------------------------------------------------
# question lists (LLaVA conversation format / official vqa_anno JSONL)

_TASK_WORDS = (("suggestion", "suggestion"), ("region", "region"), ("general", "general"))
_BOXED = re.compile(r"^(?P<dir>.*?)/?images_w_boxes/(?P<stem>.+)_object_(?P<key>[^/]+)\.(?:jpg|jpeg|png)$", re.I)


def _task_of(file_name: str, rid: str, image: str) -> str | None:
    for text in (rid.lower(), file_name.lower()):
        for word, task in _TASK_WORDS:
            if word in text:
                return task
    return "region" if _BOXED.match(image) else None


def _read_records(path: Path) -> list:
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CodaFormatError(f"{path}: malformed JSON on line {i}: {e.msg}", "malformed JSON") from None
        return records
    data = _load_json(path)
    if not isinstance(data, list):
        raise _fail(path, "(top level)", "a JSON list of question records", type(data).__name__)
    return data


def read_question_list(path: str | os.PathLike, image_root: str | os.PathLike, split: str, report: ImportReport | None = None,
                       skip_invalid: bool = False) -> list[dict]:
    """Rows from a LLaVA-format JSON / JSONL question list (records grouped by their source image)."""
    path, image_root = Path(path), Path(image_root)
    report = report if report is not None else ImportReport()
    rows: dict[str, dict] = {}
    seen_rid: dict[str, int] = {}
    for i, rec in enumerate(_read_records(path)):
        where = f"{path} record [{i}]"
        try:
            if not isinstance(rec, dict):
                raise _fail(where, "(record)", "a JSON object", rec)
            rid = rec.get("id", rec.get("question_id", _MISSING))
            if rid is _MISSING or not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise _fail(where, "id", "a string or integer record id ('id' or 'question_id')", rid, "missing field" if rid is _MISSING else "wrong type")
            rid = str(rid)
            if rid in seen_rid:
                raise _fail(where, "id", f"ids unique in the file (first at record [{seen_rid[rid]}])", rid, "duplicate id")
            seen_rid[rid] = i
            image = _get(rec, "image", where, "image", str, "an image path relative to the image root")
            if "conversations" in rec:
                conv = _get(rec, "conversations", where, "conversations", list, "a list of {from, value} turns")
                turns = {}
                for t, turn in enumerate(conv):
                    who = _get(turn, "from", where, f"conversations[{t}].from", str, "'human' or 'gpt'")
                    turns.setdefault(who, _get(turn, "value", where, f"conversations[{t}].value", str, "a string"))
                question = turns.get("human", "").replace("<image>", "").strip()
                answer = turns.get("gpt", _MISSING)
                if answer is _MISSING:
                    raise _fail(where, "conversations", "a turn from 'gpt' holding the reference answer", conv, "missing field")
            else:
                question = _get(rec, "question", where, "question", str, "a string")
                answer = _get(rec, "answer", where, "answer", str, "a string (the reference answer)")
            task = _task_of(path.name, rid, image)
            if task is None:
                raise _fail(where, "id", "an id, file name or image path telling the task (general / region / suggestion)", rid, "unknown task")
            boxed = _BOXED.match(image)
            base_rel = f"{boxed['dir']}/images/{boxed['stem']}.jpg".lstrip("/") if boxed else image
            base = resolve_image(image_root, base_rel, where, "image")
            scene = f"{Path(base_rel).parent.parent.name or 'img'}_{Path(base_rel).stem}"
            size = image_size(base, where)
            extra_image = None
            if task == "region":
                key = boxed["key"] if boxed else rid
                qid = f"{scene}:region:{key}"
                if boxed:
                    extra_image = {"frame": 0, "camera": f"{CAMERA}_box:{key}", "path": str(resolve_image(image_root, image, where, "image"))}
            else:
                qid = f"{scene}:{task}"
            if scene in rows and any(q["qid"] == qid for q in rows[scene]["qa"]):
                raise _fail(where, "id", f"one {task} question per image" + (" and object" if task == "region" else ""), qid, "duplicate id")
            # everything checked: only now touch the row, so a skipped record leaves nothing behind
            row = rows.get(scene)
            if row is None:
                meta = {"log_name": scene, "timestamp_s": 0.0, "annotation_file": str(path), "image_size": list(size), "format": "llava"}
                row = rows[scene] = new_row(scene, "coda_lm", split, tags=["corner_case"], meta=json.dumps(meta),
                                            images=[{"frame": 0, "camera": CAMERA, "path": str(base)}])
            if extra_image:
                row["images"].append(extra_image)
            row["qa"].append(_qa(qid, task, question, answer))
            report.questions[task] += 1
        except CodaFormatError as e:
            if not skip_invalid:
                raise
            report.skipped[e.kind] += 1
            report.errors.append(str(e))
    return list(rows.values())


# ----------------------------------------------------------------------------------------------
# a whole split


def split_dir(annotations: str | os.PathLike, split: str) -> Path:
    """The folder holding the split's JSON files: `annotations/<Split>` if it exists (any case), else `annotations`."""
    annotations = Path(annotations)
    if annotations.is_dir():
        for child in annotations.iterdir():
            if child.is_dir() and child.name.lower() == split.lower():
                return child
    return annotations


def read_split(annotations: str | os.PathLike, image_root: str | os.PathLike, split: str, skip_invalid: bool = False,
               report: ImportReport | None = None, progress: bool = True, strict: bool = False) -> list[dict]:
    """Rows for a split: a folder of per-image JSON files, or one LLaVA-format JSON/JSONL question list.

    `strict` False (the default): per-image files are read leniently (`read_annotation`), what is let pass is
    counted in `report.warnings`; True: every check. Question lists are always read strictly."""
    from tqdm import tqdm

    report = report if report is not None else ImportReport()
    report.strict = strict
    src = Path(annotations)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such annotation folder or file")
    if not Path(image_root).is_dir():
        raise FileNotFoundError(f"{image_root}: image root is not a folder (expected val/images/ and test/images/ inside)")
    if src.is_file():
        report.files = 1
        rows = read_question_list(src, image_root, split.lower(), report, skip_invalid)
        report.scenes = len(rows)
        return rows
    folder = split_dir(src, split)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".json")
    if not files:
        raise FileNotFoundError(f"{folder}: expected CODA-LM annotation files 'val_XXXX.json' / 'test_XXXX.json', found none")
    rows = []
    for p in tqdm(files, desc=f"coda_lm {split}", disable=not progress, leave=False):
        report.files += 1
        try:
            row = read_annotation(p, image_root, split.lower(), strict=strict, warn=report.warn)
        except CodaFormatError as e:
            if not skip_invalid:
                raise
            report.skipped[e.kind] += 1
            report.errors.append(str(e))
            continue
        rows.append(row)
        report.questions.update(q["task"] for q in row["qa"])
    report.scenes = len(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# `mose import coda`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="CODA-LM split folder of val_/test_XXXX.json (or the CODA-LM folder holding "
                        "Train/Val/Test/Mini), or one LLaVA-format JSON/JSONL question list")
    parser.add_argument("--images", required=True, help="image root holding val/images/ and test/images/")
    parser.add_argument("--split", required=True, help="split name stored in the rows (Train, Val, Test, Mini, ...)")
    parser.add_argument("--out", required=True, help="ScenePool directory to write")
    parser.add_argument("--skip-invalid", action="store_true", help="skip bad files/records and count them instead of stopping")
    parser.add_argument("--strict", action="store_true", help="check every field (every general object, boxes inside the image to 1 px, "
                        "the image present, no key twice); default: check what the evaluation reads and count the rest as warnings")


def run(args) -> int:
    from common.atomic import write_json
    from datasets_cfg.schema import ScenePool

    report = ImportReport()
    try:
        rows = read_split(args.annotations, args.images, args.split, skip_invalid=args.skip_invalid, report=report, strict=args.strict)
        if not rows:
            raise CodaFormatError(f"{args.annotations}: no valid scene to write ({sum(report.skipped.values())} skipped)", "empty")
        pool = ScenePool.from_rows(rows, where=str(args.annotations))
        pool.save(args.out)
    except (MoseError, OSError) as e:
        print(f"mose import coda: error: {e}", file=sys.stderr)
        if report.skipped:
            print(json.dumps(report.as_dict(), indent=2), file=sys.stderr)
        return 1
    write_json(Path(args.out) / "coda_import.json", report.as_dict())
    print(json.dumps(report.as_dict(), indent=2))
    if report.warnings:
        print(f"mose import coda: warning: {sum(report.warnings.values())} problem(s) the evaluation does not read were let pass "
              f"({', '.join(f'{k} {n}' for k, n in sorted(report.warnings.items()))}); --strict refuses them", file=sys.stderr)
    return 0
