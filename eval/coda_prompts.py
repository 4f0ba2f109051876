"""Prompts for CODA-LM: the questions a model answers and the instructions the judge follows.

Two sets:

- ``own_prompts()`` (default): our wording, written to the official criteria. Questions come from
  `datasets_cfg.sources.coda_lm.QUESTIONS`; the judge is zero-shot (no few-shot examples).
- ``load_official_prompts(DIR)``: the official texts, read from a user's checkout of DLUT-LYZ/CODA-LM so that
  scores are comparable with published ones. Nothing is executed: the Python files are parsed with `ast`.
  Files read (relative to the checkout root)::

      convert2vqa.py                      questions: `stage1_data = dict(question=...)` (general),
                                          stage2 (driving suggestion), stage3 (region, red rectangle)
      codalm_dataloader.py  (optional)    region question with a "<boxes>" placeholder (box-as-text encoding)
      evaluation/stage1_eval_batch.py     judge for general perception: `self.system_prompt = "..."`, the
                                          reference/prediction `template = "...{}...{}..."`, and the few-shot
                                          folder it names (scene_few_shot/) with its JSON files (high, low)
      evaluation/stage2_eval_batch.py     driving suggestion (suggestion_few_shot/)
      evaluation/stage3_eval_batch.py     region perception (no few-shot)

  Each few-shot JSON holds ``reference``, ``prediction`` and ``response`` strings.

A judge conversation is: system prompt, then (user: filled template, assistant: response) per few-shot
example, then the user turn with the item's reference and prediction. The judge must end with
``Rating: [[n]]``, n in 1..10.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import MoseError
from datasets_cfg.sources.coda_lm import QUESTIONS

TASKS = ("general", "region", "suggestion")

_OWN_TEMPLATE = "[Reference text]\n{reference}\n[End of reference text]\n\n[Predicted text]\n{prediction}\n[End of predicted text]"
_RATING_RULE = ("Do not let the length of the prediction influence your rating. Give a short explanation, then end with your rating "
                "from 1 to 10 in exactly this form: Rating: [[n]]")
_OWN_JUDGE = {
    "general": (
        "You are an impartial judge of an autonomous-driving assistant. Compare its predicted text with the reference text; both "
        "describe the objects that influence the ego car's driving and why. Judge three things: accuracy (does the prediction "
        "identify the objects of the reference?), hallucination (does it avoid objects the reference does not mention?) and the "
        "reasons (are its explanations of why each object matters for the ego car consistent with the reference?). Match objects "
        "by meaning, generously, ignoring relative positions and colours. " + _RATING_RULE
    ),
    "suggestion": (
        "You are an impartial judge of an autonomous-driving assistant. Compare its predicted driving suggestion for the ego car "
        "with the reference suggestion. Judge rationality, relevance to the scene and level of detail: good suggestions are "
        "specific and actionable, not vague or generic. Point out mistakes. Match objects by meaning, ignoring relative positions "
        "and colours. " + _RATING_RULE
    ),
    "region": (
        "You are an impartial judge of an autonomous-driving assistant. Rate how similar and relevant its predicted description "
        "of one object, and of why it matters for the ego car, is to the reference text. " + _RATING_RULE
    ),
}


class PromptError(MoseError, ValueError):
    """An official prompt file is missing or does not hold what we expect; the message names file and field."""


@dataclass
class PromptSet:
    source: str  # "own" | "official"
    origin: str  # "mose built-in" or the checkout path
    questions: dict  # task -> question text; "region_text" has a "{box}" placeholder (None if unavailable)
    judge_system: dict  # task -> system prompt
    few_shot: dict = field(default_factory=dict)  # task -> [(reference, prediction, response), ...]
    template: str = _OWN_TEMPLATE  # "{reference}" and "{prediction}" placeholders

    def question(self, task: str, box_text: str | None = None) -> str:
        if task == "region" and box_text is not None:
            q = self.questions.get("region_text")
            if not q:
                raise PromptError(f"{self.origin}: the {self.source} prompts have no region question with a box placeholder; use the drawn-box encoding")
            return q.replace("{box}", box_text)
        return self.questions[task]

    def messages(self, task: str, reference: str, prediction: str) -> list[dict]:
        """The judge conversation for one item (chat-completions `messages`)."""
        msgs = [{"role": "system", "content": self.judge_system[task]}]
        for ref, pred, resp in self.few_shot.get(task, []):
            msgs += [{"role": "user", "content": self._fill(ref, pred)}, {"role": "assistant", "content": resp}]
        return msgs + [{"role": "user", "content": self._fill(reference, prediction)}]

    def _fill(self, reference: str, prediction: str) -> str:
        # split first so that braces or placeholders inside the texts are never substituted again
        head, rest = self.template.split("{reference}", 1)
        mid, tail = rest.split("{prediction}", 1)
        return head + reference + mid + prediction + tail

    def describe(self) -> dict:
        """What goes into the outputs: which prompts, from where, and a hash of every text."""
        body = json.dumps([self.questions, self.judge_system, self.few_shot, self.template], sort_keys=True)
        return {"source": self.source, "origin": self.origin, "sha256": hashlib.sha256(body.encode()).hexdigest(),
                "questions": self.questions, "judge_system": self.judge_system,
                "few_shot_examples": {t: len(v) for t, v in self.few_shot.items()}}


def own_prompts() -> PromptSet:
    return PromptSet("own", "mose built-in", dict(QUESTIONS), dict(_OWN_JUDGE), {})


# ----------------------------------------------------------------------------------------------
# the official texts, read without executing anything


def _parse(path: Path) -> ast.Module:
    if not path.is_file():
        raise PromptError(f"{path}: missing; expected the official CODA-LM file (is the directory a checkout of DLUT-LYZ/CODA-LM?)")
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise PromptError(f"{path}: not parseable Python (line {e.lineno}): {e.msg}") from None


def _str(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _assigned_strings(tree: ast.Module, name: str, attribute: bool) -> list[str]:
    """String constants assigned to `name` (a plain variable, or `<obj>.name` when `attribute`)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                hit = isinstance(t, ast.Attribute) and t.attr == name if attribute else isinstance(t, ast.Name) and t.id == name
                if hit and _str(node.value):
                    out.append(_str(node.value))
    return out


def _one(values: list[str], path: Path, what: str) -> str:
    distinct = list(dict.fromkeys(values))
    if len(distinct) != 1:
        raise PromptError(f"{path}: field '{what}': expected exactly one string, found {len(distinct)}")
    return distinct[0]


def _questions(root: Path) -> dict:
    path = root / "convert2vqa.py"
    tree = _parse(path)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "dict":
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id in ("stage1_data", "stage2_data", "stage3_data"):
                    for kw in node.value.keywords:
                        if kw.arg == "question" and _str(kw.value):
                            found[t.id] = _str(kw.value)
    out = {}
    for var, task in (("stage1_data", "general"), ("stage2_data", "suggestion"), ("stage3_data", "region")):
        if var not in found:
            raise PromptError(f"{path}: field '{var}[question]': expected the official {task} question as a string literal, found none")
        out[task] = found[var]
    out["region_text"] = None
    loader = root / "codalm_dataloader.py"
    if loader.is_file():
        for node in ast.walk(_parse(loader)):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if k is not None and _str(k) == "region_perception" and _str(v) and "<boxes>" in _str(v):
                        out["region_text"] = _str(v).replace("<boxes>", "{box}")
    return out


def _judge(root: Path, stage: int) -> tuple[str, str, list]:
    path = root / "evaluation" / f"stage{stage}_eval_batch.py"
    tree = _parse(path)
    system = _one([s for s in _assigned_strings(tree, "system_prompt", attribute=True) if s.strip()], path, "self.system_prompt")
    if "[[" not in system:
        raise PromptError(f"{path}: field 'self.system_prompt': expected the judge instruction asking for 'Rating: [[n]]', got {system[:80]!r}")
    template = _one(_assigned_strings(tree, "template", attribute=False), path, "template")
    if template.count("{}") != 2:
        raise PromptError(f"{path}: field 'template': expected two '{{}}' placeholders (reference, prediction), got {template!r}")
    template = template.replace("{}", "{reference}", 1).replace("{}", "{prediction}", 1)
    consts = [_str(n) for n in ast.walk(tree) if _str(n)]
    shot_dirs = list(dict.fromkeys(c for c in consts if c.endswith("_few_shot")))
    shots = []
    if shot_dirs:
        folder = path.parent / _one(shot_dirs, path, "few-shot folder")
        for name in dict.fromkeys(c for c in consts if re.fullmatch(r"[\w-]+\.json", c)):  # "high.json", not ".json"
            f = folder / name
            try:
                ex = json.loads(f.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise PromptError(f"{f}: missing; {path.name} names it as a few-shot example") from None
            except json.JSONDecodeError as e:
                raise PromptError(f"{f}: malformed JSON at line {e.lineno}: {e.msg}") from None
            for key in ("reference", "prediction", "response"):
                if not isinstance(ex, dict) or not isinstance(ex.get(key), str):
                    raise PromptError(f"{f}: field '{key}': expected a string")
            shots.append((ex["reference"], ex["prediction"], ex["response"]))
    return system, template, shots


def load_official_prompts(directory: str | os.PathLike) -> PromptSet:
    """The official question and judge texts from a CODA-LM checkout (its root, or its evaluation/ folder)."""
    root = Path(directory)
    if not root.is_dir():
        raise PromptError(f"{root}: not a directory; expected a checkout of DLUT-LYZ/CODA-LM")
    if not (root / "evaluation").is_dir() and (root / "stage1_eval_batch.py").is_file():
        root = root.parent
    questions = _questions(root)
    systems, few, templates = {}, {}, set()
    for stage, task in ((1, "general"), (2, "suggestion"), (3, "region")):
        systems[task], template, shots = _judge(root, stage)
        templates.add(template)
        if shots:
            few[task] = shots
    if len(templates) != 1:
        raise PromptError(f"{root / 'evaluation'}: field 'template': expected the same reference/prediction template in the three stage scripts")
    return PromptSet("official", str(root.resolve()), questions, systems, few, templates.pop())
