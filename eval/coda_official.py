"""CODA-LM predictions in the official submission format, read as the official scripts read them, and written.

The official evaluation (DLUT-LYZ/CODA-LM@24544cc, evaluation/) takes three JSONL files, one per task, in one
folder (evaluation/README.md "Data Preparation")::

    general_perception_answer.jsonl     {"question_id": 0, "answer": ...}   # one per annotation file
    driving_suggestion_answer.jsonl     {"question_id": 0, "answer": ...}
    region_perception_answer.jsonl      {"question_id": 0, "image": ".../0001_object_2.jpg", "answer": ...}
    (or region_perception_answer_w_label.jsonl, the same with "label_name", as convert2eval.py writes it)

How they pair with the questions (the rules, each cited):

- general / suggestion: the answers sorted by integer ``question_id`` are paired with the annotation files in
  sorted-name order, answer k with file k, asserting ``question_id == k`` (stage1_eval_batch.py:177-191,
  stage2_eval_batch.py:177-190). ``scene_order`` is that list: every ``.json`` file name of the split folder,
  sorted (also the ones our import skipped, so the positions stay the official ones); for a ScenePool or a
  question list, the sorted scene ids.
- region: the answers sorted by ``question_id`` (stage3_eval_batch.py:25) are grouped by the class of their
  ``label_name`` (stage3_eval_batch.py:27), which convert2eval.py:27-32 takes from the ``image`` name
  ``XXXX_object_K.jpg`` (scene ``test_XXXX``, region key K); within each class the k-th answer is paired with
  the k-th region question of that class in file order (files sorted, regions in their order in the file;
  stage3_eval_batch.py:34-47, 92-101). The class is the official table's (eval/coda_questions.py); categories it
  does not know are one more group, paired the same way (upstream drops them from the score).

What we add: a ``question_id`` that is not an integer, an index past the last file, an index given twice, or a
class with more answers than questions is an error naming file and line (upstream: an assert or a wrong
pairing); a class with fewer answers than questions pairs its first questions and leaves the rest missing
(position pairing cannot tell which one is missing). A missing file means that task has no predictions.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from common.errors import MoseError


class CodaPredictionsError(MoseError, ValueError):
    """A predictions file that cannot be read as it claims to be (the message names file, line and field)."""


GENERAL_FILE = "general_perception_answer.jsonl"
SUGGESTION_FILE = "driving_suggestion_answer.jsonl"
REGION_FILES = ("region_perception_answer_w_label.jsonl", "region_perception_answer.jsonl")
OFFICIAL_FILES = (GENERAL_FILE, SUGGESTION_FILE) + REGION_FILES


def is_official(path: str | os.PathLike) -> bool:
    """A folder holding at least one of the official file names."""
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in OFFICIAL_FILES)


def _records(path: Path):
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CodaPredictionsError(f"{where}: malformed JSON ({e.msg})", "malformed JSON") from None
        if not isinstance(rec, dict) or type(rec.get("question_id")) is not int:
            raise CodaPredictionsError(f"{where}: field 'question_id': expected an integer (the official format), got "
                                       f"{rec.get('question_id') if isinstance(rec, dict) else rec!r:.60}", "wrong type")
        if not isinstance(rec.get("answer"), str):
            raise CodaPredictionsError(f"{where}: field 'answer': expected a string, got {rec.get('answer')!r:.60}", "wrong type")
        out.append((rec["question_id"], where, rec))
    seen = Counter(q for q, _, _ in out)
    for q, where, _ in out:
        if seen[q] > 1:
            raise CodaPredictionsError(f"{where}: field 'question_id': expected each id once, got {q} again", "duplicate id")
    return sorted(out, key=lambda t: t[0])  # stage1_eval_batch.py:179, stage3_eval_batch.py:25


def _region_order(questions: list[dict], scene_order: list[str]) -> list[dict]:
    rank = {s: i for i, s in enumerate(scene_order)}
    regions = [(rank.get(q["scene_id"], len(rank)), i, q) for i, q in enumerate(questions) if q["task"] == "region"]
    return [q for _, _, q in sorted(regions, key=lambda t: (t[0], t[1]))]


def _region_key(q: dict) -> str:
    return q["question_id"].rsplit(":", 1)[-1]


def load_official_predictions(folder: str | os.PathLike, questions: list[dict], scene_order: list[str]) -> dict[str, str]:
    """{our question id: answer} from a folder of official-format files (module doc: the pairing rules)."""
    folder = Path(folder)
    out: dict[str, str] = {}
    by_scene_task = {(q["scene_id"], q["task"]): q["question_id"] for q in questions if q["task"] in ("general", "suggestion")}
    for name, task in ((GENERAL_FILE, "general"), (SUGGESTION_FILE, "suggestion")):
        path = folder / name
        if not path.is_file():
            continue
        for k, where, rec in _records(path):
            if not 0 <= k < len(scene_order):
                raise CodaPredictionsError(f"{where}: field 'question_id': expected an index 0..{len(scene_order) - 1} of the "
                                           f"{len(scene_order)} annotation files in sorted order, got {k}", "unknown id")
            qid = by_scene_task.get((scene_order[k], task))
            if qid is None:
                raise CodaPredictionsError(f"{where}: field 'question_id': {k} is scene {scene_order[k]!r}, which has no {task} question "
                                           "(skipped at import?)", "unknown id")
            out[qid] = rec["answer"]
    region_path = next((folder / n for n in REGION_FILES if (folder / n).is_file()), None)
    if region_path is not None:
        regions = _region_order(questions, scene_order)
        by_image = {(q["scene_id"], _region_key(q)): q for q in regions}
        gt = defaultdict(list)  # official class (None: not in the table) -> questions in file order
        for q in regions:
            gt[q.get("official_class")].append(q)
        taken = defaultdict(int)
        for _, where, rec in _records(region_path):
            if isinstance(rec.get("label_name"), str):
                from eval.coda_questions import official_class_of

                cls = official_class_of(rec["label_name"])
            elif isinstance(rec.get("image"), str):
                # convert2eval.py:28-32: "<dir>/XXXX_object_K.jpg" -> scene "test_XXXX", region key K
                name = rec["image"].split("/")[-1]
                scene, key = "test_" + name.split("_")[0], name.split("_")[-1][:-4]
                q = by_image.get((scene, key))
                if q is None:
                    raise CodaPredictionsError(f"{where}: field 'image': {rec['image']!r} names scene {scene!r} region {key!r}, "
                                               "which is not an evaluated region question", "unknown id")
                cls = q.get("official_class")
            else:
                raise CodaPredictionsError(f"{where}: expected field 'label_name' or 'image' (the official region format), got neither",
                                           "missing field")
            k = taken[cls]
            if k >= len(gt[cls]):
                raise CodaPredictionsError(f"{where}: more region answers of class {cls or '(not in the official table)'} than the "
                                           f"{len(gt[cls])} region questions of that class", "unknown id")
            taken[cls] += 1
            out[gt[cls][k]["question_id"]] = rec["answer"]
    return out


def write_official_predictions(folder: str | os.PathLike, questions: list[dict], predictions: dict[str, str], scene_order: list[str]) -> list[Path]:
    """Our predictions as the three official files (what `load_official_predictions` reads back to the same pairs).

    general / suggestion: ``question_id`` = the scene's index in `scene_order`; region: ``question_id`` 0.. in file
    order, ``image`` = ``<scene number>_object_<key>.jpg`` and ``label_name`` = the category (as convert2eval.py
    adds it). General / suggestion questions without a prediction are left out (their index says which they
    are); a region question without one is an error, since region answers pair by position."""
    from common.atomic import write_jsonl
    folder = Path(folder)
    rank = {s: i for i, s in enumerate(scene_order)}
    written = []
    for name, task in ((GENERAL_FILE, "general"), (SUGGESTION_FILE, "suggestion")):
        recs = sorted(({"question_id": rank[q["scene_id"]], "answer": predictions[q["question_id"]]}
                       for q in questions if q["task"] == task and q["question_id"] in predictions and q["scene_id"] in rank),
                      key=lambda r: r["question_id"])
        write_jsonl(folder / name, recs)
        written.append(folder / name)
    regions = _region_order(questions, scene_order)
    lacking = [q["question_id"] for q in regions if q["question_id"] not in predictions]
    if lacking:
        raise CodaPredictionsError(f"{len(lacking)} region question(s) have no prediction (first: {lacking[0]!r}); the official region "
                                   "format pairs answers by position, so it cannot leave one out")
    recs = [{"question_id": i, "image": f"{q['scene_id'].split('_', 1)[-1]}_object_{_region_key(q)}.jpg", "label_name": q["category"],
             "answer": predictions[q["question_id"]]} for i, q in enumerate(regions)]
    write_jsonl(folder / REGION_FILES[0], recs)
    written.append(folder / REGION_FILES[0])
    return written
