"""Answer CODA-LM questions with a transformers vision-language checkpoint, in batches, resumably.

Works for any checkpoint `AutoModelForImageTextToText` + `AutoProcessor` can load (LLaVA, Qwen-VL, ...; MoSE
checkpoints register themselves with the Auto classes when `mose.modeling` is importable). Decoding is greedy.
The prompt is the processor's chat template applied to one user turn (image, then question text); a processor
without a chat template gets ``"<image token>\\n{question}"``.

`constrained=True` decodes through the step-by-step answer grammar (mose/answer_grammar.py): every answer then
parses with `mose.skill_format.parse_answer` (8 poses, closed tags) within `max_new_tokens`. Off by default (CODA
answers are free text); with it off, generation is plain greedy `generate`.

Predictions are appended to a JSONL file, one line per question id (with the model and the question text),
flushed after every batch: an interrupted run leaves whole lines (a last line cut short is dropped on resume)
and the next run answers only the ids the file does not have yet. Resuming with another model or reworded
questions is refused rather than mixed into one file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_predictions_log(path: str | os.PathLike) -> dict[str, dict]:
    """Records of a (possibly interrupted) predictions log, by question id; truncates a cut-off last line."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    good_end, out = 0, {}
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # cut short by a crash
        try:
            rec = json.loads(line)
            out[rec["question_id"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        good_end += len(line)
    if good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return out


class Generator:
    """Parameters in __init__; `load()` sets `model_` and `processor_`; `run()` answers what is not answered yet."""

    def __init__(self, model_path: str, batch_size: int = 4, max_new_tokens: int = 512, device: str | None = None, dtype: str = "auto",
                 constrained: bool = False, taxonomy=None):
        self.model_path = model_path
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.dtype = dtype
        self.constrained = constrained
        self.taxonomy = taxonomy

    def load(self) -> "Generator":
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:  # MoSE registers its classes with the Auto factories on import
            import mose.modeling  # noqa: F401
        except ImportError:
            pass
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        self.processor_ = AutoProcessor.from_pretrained(self.model_path)
        self.model_ = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=dtype).to(device).eval()
        tok = getattr(self.processor_, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # decoder-only batched generation
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        self.device_ = device
        if self.constrained:
            from mose.answer_grammar import AnswerConstraint

            eos = self.model_.generation_config.eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            eos = list(dict.fromkeys([tok.eos_token_id, *eos]))
            from mose.skills import load_taxonomy

            # the public entry point: None means the packaged taxonomy, resolved here once
            tax = self.taxonomy if self.taxonomy is not None else load_taxonomy(None)
            self.constraint_ = AnswerConstraint(tok, tax, eos_token_ids=[e for e in eos if e is not None])
            self.constraint_.logits_processor(self.max_new_tokens)  # a budget below the shortest answer fails here, before any generation
        return self

    def _prompt(self, question: str) -> str:
        p = self.processor_
        if getattr(p, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return p.apply_chat_template(msgs, add_generation_prompt=True)
        return f"{getattr(p, 'image_token', '<image>')}\n{question}"

    def answer(self, questions: list[dict]) -> list[str]:
        """Answers for one batch of question records (each with "question" and "image")."""
        import torch
        from PIL import Image

        images = []
        for q in questions:
            with Image.open(q["image"]) as im:
                images.append(im.convert("RGB"))
        inputs = self.processor_(images=images, text=[self._prompt(q["question"]) for q in questions], return_tensors="pt", padding=True)
        inputs = inputs.to(self.device_)
        if "pixel_values" in inputs and self.model_.dtype.is_floating_point:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model_.dtype)
        extra = {}
        if self.constrained:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([self.constraint_.logits_processor(self.max_new_tokens)])
        with torch.inference_mode():
            out = self.model_.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, **extra)
        new = out[:, inputs["input_ids"].shape[1]:]
        pad = self.processor_.tokenizer.pad_token_id
        self.last_new_tokens_ = [int((row != pad).sum()) if pad is not None else int(row.numel()) for row in new]  # per answer
        return [t.strip() for t in self.processor_.batch_decode(new, skip_special_tokens=True)]

    def run(self, questions: list[dict], out_path: str | os.PathLike, progress: bool = True) -> dict:
        """Append answers for questions whose id `out_path` lacks; returns counts."""
        from tqdm import tqdm

        out_path = Path(out_path)
        done = read_predictions_log(out_path)
        asked = {q["question_id"]: q["question"] for q in questions}
        for qid, rec in done.items():  # resuming must not mix models or prompts in one file
            if rec.get("model") != str(self.model_path) or (qid in asked and rec.get("question") != asked[qid]):
                what = f"model {rec.get('model')!r}" if rec.get("model") != str(self.model_path) else "a differently worded question"
                raise ValueError(f"{out_path}: line for {qid!r} was answered by {what}; expected {self.model_path!r} with the current prompts "
                                 f"(use another --out, or delete the file to start over)")
        todo = [q for q in questions if q["question_id"] not in done]
        if todo and not hasattr(self, "model_"):
            self.load()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "a", encoding="utf-8") as f:
            for i in tqdm(range(0, len(todo), self.batch_size), desc="generate", disable=not progress, leave=False):
                batch = todo[i:i + self.batch_size]
                for q, a in zip(batch, self.answer(batch)):
                    f.write(json.dumps({"question_id": q["question_id"], "task": q["task"], "answer": a, "model": str(self.model_path),
                                        "question": q["question"]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return {"already_done": len(questions) - len(todo), "generated": len(todo)}
