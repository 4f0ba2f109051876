"""The three CODA-LM tasks' questions, built from ScenePool rows (real CODA-LM imports or simulator scenes).

A row contributes (see datasets_cfg/sources/coda_lm.py for the qa layout):

- general perception: each qa with task "general" and an empty category is one question; a row whose "general"
  qa all carry a category (per-category annotations only) gets one question ``{scene}:general`` whose
  reference joins them. The classes annotated in the scene (general categories and region categories, mapped to
  the 7 classes) are kept for the object-recall score.
- region perception: each qa with task "region". The box [x, y, w, h] (pixels) is drawn as a red rectangle of
  width 2 on a copy of the image (``box_encoding="draw"``, the official encoding) or given as normalised
  ``<x1, y1, x2, y2>`` text in the question (``"text"``). A region qa without a box uses the row's pre-drawn image
  (camera ``<cam>_box:<key>``), as LLaVA-format imports carry.
- driving suggestion: each qa with task "suggestion".

The question text always comes from the prompt set (own or official), so every scene is asked the same way.

Region classes, two views of a region question's ``category_name``:

- ``official_class`` (what the scores use): the official table `OFFICIAL_CATEGORY_TO_CLASS`, an exact,
  case-sensitive name lookup (DLUT-LYZ/CODA-LM@24544cc evaluation/stage3_eval_batch.py:49-70: "Car" is not
  "car", and the table spells "suitcace"); a name outside it gets None and, as upstream, the question counts in
  no class and not in the region score (stage3_eval_batch.py:243-279 loops over the 7 classes only).
- ``class`` (our extended view, scores.json ``region_extended`` with ``--region-extended``): `class_of`, the
  official table plus a few names (lower-cased, "suitcase", "van", the class names themselves, the ScenePool
  agent categories "czone_sign" and "generic_object", the general-perception keys of `GENERAL_KEY_TO_CLASS`);
  names it does not know go to the class "other".
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

from datasets_cfg.sources.coda_lm import CodaFormatError, check_box, image_size

REGION_CLASSES = ("vehicle", "vru", "traffic_sign", "traffic_light", "traffic_cone", "barrier", "miscellaneous")
# The official table, name for name (evaluation/stage3_eval_batch.py:50-58, DLUT-LYZ/CODA-LM@24544cc).
OFFICIAL_CATEGORY_TO_CLASS = {
    **dict.fromkeys(["car", "truck", "tram", "tricycle", "bus", "trailer", "construction_vehicle", "recreational_vehicle"], "vehicle"),
    **dict.fromkeys(["pedestrian", "cyclist", "bicycle", "moped", "motorcycle", "stroller", "wheelchair", "cart"], "vru"),
    **dict.fromkeys(["warning_sign", "traffic_sign"], "traffic_sign"),
    "traffic_light": "traffic_light",
    "traffic_cone": "traffic_cone",
    **dict.fromkeys(["barrier", "bollard"], "barrier"),
    **dict.fromkeys(["dog", "cat", "sentry_box", "traffic_box", "traffic_island", "debris", "suitcace", "dustbin", "concrete_block",
                     "machinery", "chair", "phone_booth", "basket", "cardboard", "carton", "garbage", "garbage_bag", "plastic_bag", "stone",
                     "tire", "misc"], "miscellaneous"),
}
CATEGORY_TO_CLASS = {
    **dict.fromkeys(["car", "truck", "tram", "tricycle", "bus", "trailer", "construction_vehicle", "recreational_vehicle", "vehicle", "van"], "vehicle"),
    **dict.fromkeys(["pedestrian", "cyclist", "bicycle", "moped", "motorcycle", "stroller", "wheelchair", "cart", "vru"], "vru"),
    **dict.fromkeys(["warning_sign", "traffic_sign"], "traffic_sign"),
    "traffic_light": "traffic_light",
    "traffic_cone": "traffic_cone",
    **dict.fromkeys(["barrier", "bollard"], "barrier"),
    **dict.fromkeys(["dog", "cat", "sentry_box", "traffic_box", "traffic_island", "debris", "suitcase", "suitcace", "dustbin", "concrete_block",
                     "machinery", "chair", "phone_booth", "basket", "cardboard", "carton", "garbage", "garbage_bag", "plastic_bag", "stone",
                     "tire", "misc", "miscellaneous"], "miscellaneous"),
    # ScenePool agent categories (simulator scenes)
    "czone_sign": "traffic_sign", "generic_object": "miscellaneous",
}
GENERAL_KEY_TO_CLASS = {
    "vehicles": "vehicle", "vulnerable_road_users": "vru", "traffic_signs": "traffic_sign", "traffic_lights": "traffic_light",
    "traffic_cones": "traffic_cone", "barriers": "barrier", "other_objects": "miscellaneous",
}
OTHER = "other"


def official_class_of(category: str) -> str | None:
    """The official class of a category name (exact lookup in the official table), None when upstream drops it."""
    return OFFICIAL_CATEGORY_TO_CLASS.get(category)


def class_of(category: str) -> str:
    """One of `REGION_CLASSES`, or "other" for a name neither mapping knows (or an empty one)."""
    key = "_".join(category.lower().replace("-", " ").split())
    return CATEGORY_TO_CLASS.get(key) or GENERAL_KEY_TO_CLASS.get(key) or OTHER


def box_text(box, size) -> str:
    """[x, y, w, h] pixels -> "<x1, y1, x2, y2>" normalised by the image width and height, 3 decimals."""
    x, y, w, h = box
    W, H = size
    return f"<{x / W:.3f}, {y / H:.3f}, {(x + w) / W:.3f}, {(y + h) / H:.3f}>"


def draw_box(src: Path, box, dst: Path) -> Path:
    """A copy of `src` with the box drawn as a red rectangle of width 2 (as the official convert2vqa.py does)."""
    from PIL import Image, ImageDraw

    from common.atomic import atomic_path

    x, y, w, h = box
    with Image.open(src) as im:
        im = im.convert("RGB")
        ImageDraw.Draw(im).rectangle([x, y, x + w, y + h], outline="red", width=2)
        with atomic_path(dst, suffix=".jpg") as tmp:
            im.save(tmp, format="JPEG")
    return dst


def _safe_name(qid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", qid)[:80] + "_" + hashlib.sha1(qid.encode()).hexdigest()[:8]


class QuestionBuilder:
    """Rows -> question records. Bad scenes raise `CodaFormatError` or, with `skip_invalid`, are counted in `skipped_`.

    `lenient` (rows from a lenient CODA-LM import): a region box reaching outside the image is kept as given, and,
    when `need_images` is False (predictions given, nothing to generate), a missing image is no error: its
    questions keep the image path and region boxes are not drawn; both are counted in `warnings_`."""

    def __init__(self, prompts, out_dir: str | os.PathLike, box_encoding: str = "draw", skip_invalid: bool = False,
                 lenient: bool = False, need_images: bool = True):
        if box_encoding not in ("draw", "text"):
            raise ValueError(f"box_encoding must be 'draw' or 'text', got {box_encoding!r}")
        self.prompts = prompts
        self.out_dir = Path(out_dir)
        self.box_encoding = box_encoding
        self.skip_invalid = skip_invalid
        self.lenient = lenient
        self.need_images = need_images

    def _warn(self, err: CodaFormatError) -> None:
        self.warnings_[err.kind] += 1

    def build(self, rows, root: str | os.PathLike | None = None) -> list[dict]:
        """`rows`: ScenePool rows (dicts); relative image paths resolve under `root` (the pool directory)."""
        self.skipped_: Counter = Counter()
        self.warnings_: Counter = Counter()
        self.errors_: list[str] = []
        out, seen = [], {}
        for row in rows:
            try:
                qs = self._scene(row, Path(root) if root is not None else None)
                for q in qs:
                    if q["question_id"] in seen:
                        raise CodaFormatError(f"scene {row['id']}: field 'qa.qid': expected question ids unique across scenes, got "
                                              f"{q['question_id']!r} again (first in scene {seen[q['question_id']]!r})", "duplicate id")
            except CodaFormatError as e:
                if not self.skip_invalid:
                    raise
                n = sum(1 for q in row["qa"] if q["task"] in ("general", "region", "suggestion")) or 1
                self.skipped_[e.kind] += n
                self.errors_.append(str(e))
                continue
            for q in qs:
                seen[q["question_id"]] = row["id"]
            out.extend(qs)
        return out

    # one scene --------------------------------------------------------------------------------
    def _image(self, row, root):
        where = f"scene {row['id']}"
        frame = int(row.get("current_index", 0))
        images = [im for im in row["images"] if "_box:" not in im["camera"]]
        images = [im for im in images if im["frame"] == frame] or images
        if not images:
            raise CodaFormatError(f"{where}: field 'images': expected an image for the current frame, got none", "missing image")
        p = Path(images[0]["path"])
        p = p if p.is_absolute() or root is None else root / p
        if not p.is_file():
            err = CodaFormatError(f"{where}: field 'images[0].path': expected an existing image file, got {str(p)!r}", "missing image")
            if self.need_images or not self.lenient:
                raise err
            self._warn(err)
            return p, None
        return p, image_size(p, where)

    def _scene(self, row, root) -> list[dict]:
        sid = row["id"]
        qa = row["qa"]
        if not any(q["task"] in ("general", "region", "suggestion") for q in qa):
            return []
        image, size = self._image(row, root)
        base = {"scene_id": sid, "image": str(image), "category": "", "class": "", "box": []}
        annotated = sorted({class_of(q["category"]) for q in qa if q["category"] and q["task"] in ("general", "general_object", "region")} - {OTHER})
        out = []

        general = [q for q in qa if q["task"] == "general"]
        summaries = [q for q in general if not q["category"]]
        if general and not summaries:
            summaries = [{"qid": f"{sid}:general", "answer": " ".join(q["answer"] for q in general)}]
        for q in summaries:
            out.append({**base, "question_id": q["qid"], "task": "general", "question": self.prompts.question("general"),
                        "reference": q["answer"], "annotated_classes": annotated})

        boxed = {im["camera"].split("_box:", 1)[1]: im["path"] for im in row["images"] if "_box:" in im["camera"]}
        for q in (q for q in qa if q["task"] == "region"):
            rec = {**base, "question_id": q["qid"], "task": "region", "reference": q["answer"], "category": q["category"],
                   "class": class_of(q["category"]), "official_class": official_class_of(q["category"])}
            if len(q["box"]):
                box = check_box([float(v) for v in q["box"]], size, f"scene {sid}", f"qa[{q['qid']}].box", self._warn if self.lenient else None)
                rec["box"] = box
                if size is None:  # lenient, image missing, nothing to generate: the question is asked of no image
                    rec["question"] = self.prompts.question("region")
                elif self.box_encoding == "text":
                    rec["question"] = self.prompts.question("region", box_text(box, size))
                else:
                    rec["question"] = self.prompts.question("region")
                    rec["image"] = str(draw_box(image, box, self.out_dir / "region_images" / f"{_safe_name(q['qid'])}.jpg"))
            else:
                key = q["qid"].rsplit(":", 1)[-1]
                if key not in boxed:
                    raise CodaFormatError(f"scene {sid}: field 'qa[{q['qid']}].box': expected [x, y, w, h] or a pre-drawn image "
                                          f"(camera '*_box:{key}'), got neither", "missing field")
                p = Path(boxed[key])
                p = p if p.is_absolute() or root is None else root / p
                if not p.is_file():
                    raise CodaFormatError(f"scene {sid}: field 'images[*_box:{key}].path': expected an existing image file, got {str(p)!r}", "missing image")
                rec["question"], rec["image"] = self.prompts.question("region"), str(p)
            out.append(rec)

        for q in (q for q in qa if q["task"] == "suggestion"):
            out.append({**base, "question_id": q["qid"], "task": "suggestion", "question": self.prompts.question("suggestion"), "reference": q["answer"]})
        return out


def rows_from(annotations: str | os.PathLike, images: str | os.PathLike | None, split: str | None, skip_invalid: bool, report=None,
              strict: bool = False):
    """(rows, root) from a ScenePool directory or from CODA-LM annotations (folder of JSON, or a question list; root None);
    `strict`: the import mode of CODA-LM annotation files (datasets_cfg/sources/coda_lm.py)."""
    path = Path(annotations)
    if (path / "pool.json").is_file():
        from datasets_cfg.schema import ScenePool

        pool = ScenePool.load(path)
        return [s.row for s in pool], path
    from datasets_cfg.sources.coda_lm import read_split

    if images is None:
        raise ValueError(f"{path}: CODA-LM annotations need --images (the folder holding val/images/ and test/images/)")
    split = split or path.stem
    return read_split(path, images, split, skip_invalid=skip_invalid, report=report, strict=strict), None


def write_questions(path: str | os.PathLike, questions: list[dict]) -> None:
    from common.atomic import write_jsonl

    write_jsonl(path, questions)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
