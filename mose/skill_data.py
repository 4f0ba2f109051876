"""The hierarchical skill dataset as model inputs: per-token skill labels (offset-aligned) and a collator.

Input: items (plain dicts or a `datasets.Dataset`) with ``item_id, prompt, target, spans: [{start, end, skill}],
images: [path], box`` (built from ScenePool rows by datasets_cfg/skill_items.py; the target format is in
mose/skill_format.py). Output of `build_skill_dataset`: the items plus

- ``text``: the whole conversation as the processor's chat template writes it (user turn with one image
  placeholder per image, then the assistant turn with the target);
- ``input_ids``: its tokens before image-token expansion; ``labels``: -100 on the prompt, the token ids on the
  answer and on the end-of-turn token that closes it; ``skill_labels``: -100 on the prompt and after the
  answer, else the taxonomy id of the span the token's last non-space character falls in (found through the
  tokenizer's offset_mapping, so labels follow characters, not a re-tokenisation of pieces);
- ``length``: tokens after image expansion (what the model sees); ``skill_counts``: labelled tokens per skill id.

Too long (``length > max_length``), unknown skills in spans, templates that do not reproduce the target: the
item is skipped and counted in `SkillDataReport` (``strict=True`` raises instead). Nothing is truncated.

`SkillCollator` calls the processor on the conversation texts and images (the processor expands image tokens:
LLaVA repeats ``<image>``, Qwen2-VL repeats ``<|image_pad|>`` by image size), then stretches the labels over each
expanded run (-100 there) and checks that every other token equals the pre-tokenised one, so labels can not
drift. `mose.skill_sampler.SkillBalancedSampler` draws items so that the labelled-token share per skill matches a
target. With the HF Trainer, set `remove_unused_columns=False` (the collator reads `text`, `images`, `box`).

`SkillCollator(processor, plan=True)` (models with `trajectory_decoder="head"`, mose/trajectory_decoders.py) also
returns the planning head's inputs: ``ego_speed`` (B,) the speed the item's prompt states (NaN: none), ``plan_index`` (B,)
the position of the last prompt token (the token before the first labelled one) and ``plan_targets`` (B, 8, 2) the
target's ``[trajectory]`` poses; rows without a speed or a complete trajectory get plan_index -1 (no head loss).
Without ``plan`` the batch is exactly as before.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.errors import MoseError
from mose.skills import Taxonomy, UnknownSkillError

IGNORE = -100


class SkillDataError(MoseError, ValueError):
    """An item can not be turned into model inputs; the message names the item, `reason` is a short category."""

    def __init__(self, message: str, reason: str = "other"):
        super().__init__(message)
        self.reason = reason


class AlignmentError(SkillDataError):
    """The processor's tokens differ from the pre-tokenised ones outside image-token runs."""

    def __init__(self, message: str):
        super().__init__(message, "alignment")


# ----------------------------------------------------------------------------------------------
# processors


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def image_token_id(processor) -> int | None:
    """The placeholder token the processor expands per image (None for a plain tokenizer)."""
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None):
        tid = tokenizer_of(processor).convert_tokens_to_ids(processor.image_token)
    return tid if hasattr(processor, "image_processor") else None


def messages(prompt: str, num_images: int, target: str | None = None) -> list[dict]:
    """A single-turn conversation in the list-of-parts form chat templates of VLM processors read."""
    user = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    out = [{"role": "user", "content": user}]
    if target is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
    return out


def chat_texts(processor, prompt: str, target: str, num_images: int) -> tuple[str, str]:
    """(prompt text ending with the assistant header, whole conversation text) from the chat template."""
    if num_images and image_token_id(processor) is None:
        raise SkillDataError(f"{type(processor).__name__} has no image processor, but the item has {num_images} image(s)", "no image processor")
    render = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    if getattr(render, "chat_template", None) is None:
        raise SkillDataError(f"{type(processor).__name__}: no chat template set (processor.chat_template / tokenizer.chat_template)", "no chat template")
    head = render.apply_chat_template(messages(prompt, num_images), tokenize=False, add_generation_prompt=True)
    full = render.apply_chat_template(messages(prompt, num_images, target), tokenize=False)
    return head, full


class ImageTokenCounter:
    """Tokens one image becomes after the processor's expansion, measured by running the processor once per
    image size (exact for any processor; cached)."""

    def __init__(self, processor):
        self.processor = processor
        self._cache: dict[tuple[int, int], int] = {}

    def __call__(self, path: str) -> int:
        from PIL import Image

        with Image.open(path) as im:  # reads the header only
            size = im.size
        if size not in self._cache:
            p = self.processor
            enc = p(text=[p.image_token], images=[Image.new("RGB", size)], add_special_tokens=False)
            self._cache[size] = int(np.sum(np.asarray(enc["input_ids"][0]) == image_token_id(p)))
        return self._cache[size]


# ----------------------------------------------------------------------------------------------
# one item -> tokens and labels


def _end_of_turn(tok, suffix: str) -> int:
    """Characters of `suffix` (the text after the answer) up to and including the first special token."""
    specials = [t for t in tok.all_special_tokens if t] + [str(t) for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    hits = [(suffix.find(t), len(t)) for t in set(specials) if suffix.find(t) >= 0]
    if not hits:
        return 0
    i, n = min(hits)
    return i + n


def encode_item(item: Mapping[str, Any], processor, taxonomy: Taxonomy, *, max_length: int | None = None,
                image_tokens: ImageTokenCounter | None = None) -> dict:
    """Tokens, labels and skill labels of one item (see the module doc). Raises SkillDataError naming the item."""
    tax = taxonomy
    tok = tokenizer_of(processor)
    ident = item.get("item_id", "?")
    prompt, target, spans = item["prompt"], item["target"], item["spans"]
    images = list(item.get("images") or [])
    head, full = chat_texts(processor, prompt, target, len(images))
    if not full.startswith(head):
        raise SkillDataError(f"item {ident}: the chat template's prompt is not a prefix of the conversation; can not mask the prompt",
                             "template prompt not a prefix")
    t0 = full.find(target, len(head))
    if t0 < 0 or not target:
        raise SkillDataError(f"item {ident}: the chat template does not reproduce the target text verbatim (empty or altered answer)",
                             "template alters target")
    t1 = t0 + len(target)
    eot = t1 + _end_of_turn(tok, full[t1:])

    # character -> skill id over the target
    char_skill = np.full(len(target), IGNORE, dtype=np.int64)
    for sp in spans:
        a, b, name = int(sp["start"]), int(sp["end"]), sp["skill"]
        if not 0 <= a <= b <= len(target):
            raise SkillDataError(f"item {ident}: span [{a}, {b}) of skill {name!r} lies outside the target ({len(target)} characters)",
                                 "span outside target")
        try:
            char_skill[a:b] = tax.id(name)
        except UnknownSkillError as exc:
            raise SkillDataError(f"item {ident}: {exc}", "unknown skill") from None

    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels, skills = [IGNORE] * len(ids), [IGNORE] * len(ids)
    prev_end = 0
    for i, (s, e) in enumerate(offsets):
        if s == e:  # zero-width token: place it where the previous one ended
            s = e = prev_end
        prev_end = e
        if e <= t0:
            continue  # prompt
        if s >= t1:
            if e <= eot:
                labels[i] = ids[i]  # the end-of-turn token closes the answer
            continue
        labels[i] = ids[i]
        a, b = max(s, t0) - t0, min(e, t1) - t0
        piece = target[a:b]
        last = a + max((k for k, ch in enumerate(piece) if not ch.isspace()), default=len(piece) - 1)
        skills[i] = int(char_skill[last])

    img_id = image_token_id(processor)
    n_placeholders = sum(1 for t in ids if t == img_id) if img_id is not None else 0
    if n_placeholders != len(images):
        raise SkillDataError(f"item {ident}: {len(images)} image(s) but {n_placeholders} image placeholder token(s) in the template output",
                             "image placeholders")
    length = len(ids)
    if images:
        counter = image_tokens or ImageTokenCounter(processor)
        for p in images:
            if not os.path.isfile(p):
                raise SkillDataError(f"item {ident}: image {p} not found", "missing image")
            length += counter(p) - 1
    if max_length is not None and length > max_length:
        raise SkillDataError(f"item {ident}: {length} tokens after image expansion > max_length {max_length}", "too long")
    counts = Counter(s for s in skills if s != IGNORE)
    return {"text": full, "input_ids": ids, "labels": labels, "skill_labels": skills, "length": length,
            "skill_counts": [int(counts.get(k, 0)) for k in range(len(tax))]}


# ----------------------------------------------------------------------------------------------
# the dataset


@dataclass
class SkillDataReport:
    items_in: int = 0
    items_out: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_examples: dict = field(default_factory=dict)  # reason -> first messages
    tokens_per_skill: dict = field(default_factory=dict)  # skill name -> labelled tokens

    def as_dict(self) -> dict:
        return {"items_in": self.items_in, "items_out": self.items_out, "skipped": dict(self.skipped),
                "skipped_examples": self.skipped_examples, "tokens_per_skill": self.tokens_per_skill}


def build_skill_dataset(items, processor, taxonomy: Taxonomy, *, max_length: int | None = None,
                        num_proc: int | None = None, cache_dir: str | os.PathLike | None = None, strict: bool = False):
    """Tokenise items with `datasets.map` -> (Dataset, SkillDataReport). Bad items are skipped and counted.

    `cache_dir`: `map` writes its result there under a key of (this module's code, items, tokenizer, chat template,
    image processor, taxonomy, max_length), and a later call with the same key reads it back instead of
    re-tokenising. Without `cache_dir` nothing is cached (an in-memory map).
    """
    from datasets import Dataset

    tax = taxonomy
    ds = items if isinstance(items, Dataset) else Dataset.from_list(list(items))
    cache = {"keep_in_memory": True}
    if cache_dir is not None:
        key = _cache_key(ds, processor, tax, max_length)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache = {"cache_file_name": str(Path(cache_dir) / f"skill-tokens-{key}.arrow"), "new_fingerprint": key,
                 "load_from_cache_file": True}
    counter = ImageTokenCounter(processor)

    def encode(item: dict) -> dict:
        try:
            return encode_item(item, processor, tax, max_length=max_length, image_tokens=counter) | {"error": "", "reason": ""}
        except SkillDataError as exc:
            if strict:
                raise
            return {"text": "", "input_ids": [], "labels": [], "skill_labels": [], "length": 0,
                    "skill_counts": [0] * len(tax), "error": str(exc), "reason": exc.reason}

    out = ds.map(encode, num_proc=num_proc, desc="tokenising skill items", **cache)
    report = SkillDataReport(items_in=len(out))
    errors = out["error"]
    for e, r in zip(errors, out["reason"]):
        if e:
            report.skipped[r] += 1
            ex = report.skipped_examples.setdefault(r, [])
            if len(ex) < 3:
                ex.append(e)
    out = out.select([i for i, e in enumerate(errors) if not e]).remove_columns(["error", "reason"])
    report.items_out = len(out)
    totals = np.sum(np.asarray(out["skill_counts"], dtype=np.int64).reshape(len(out), len(tax)), axis=0)
    report.tokens_per_skill = {n: int(totals[tax.id(n)]) for n in tax.names}
    return out, report


def _cache_key(ds, processor, tax: Taxonomy, max_length: int | None) -> str:
    """A content hash: this module's code, the items' text columns, the tokenizer, templates, image processor,
    taxonomy, limit (so a change to any of them re-tokenises instead of reading a stale cache)."""
    import json

    h = hashlib.sha256(Path(__file__).read_bytes())
    for col in ("item_id", "prompt", "target", "spans", "images", "box"):
        if col in ds.column_names:
            h.update(json.dumps(ds[col], sort_keys=True, default=str).encode())
    tok = tokenizer_of(processor)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # padding / truncation state changes with every call: leave it out
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tok.get_vocab().items())).encode())
    h.update(str(getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)).encode())
    ip = getattr(processor, "image_processor", None)
    h.update((ip.to_json_string() if ip is not None else "").encode())
    h.update(json.dumps({n: [s.parent] for n, s in tax.skills.items()}).encode())
    h.update(str(max_length).encode())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------------------------
# the collator


def expand_over_images(ids: Sequence[int], labels: Sequence[int], skills: Sequence[int], expanded: Sequence[int],
                       img_id: int | None, ident: str = "?") -> tuple[list[int], list[int]]:
    """Stretch per-token labels over the processor's expanded sequence `expanded` (image runs get -100).

    Every token outside image runs must equal the pre-tokenised one, else AlignmentError (labels would drift).
    """
    out_l, out_s = [], []
    i = j = 0
    while i < len(ids):
        if img_id is not None and ids[i] == img_id:
            m = n = 0
            while i + m < len(ids) and ids[i + m] == img_id:
                m += 1
            while j + n < len(expanded) and expanded[j + n] == img_id:
                n += 1
            if n < m:
                raise AlignmentError(f"item {ident}: {m} image placeholder(s) at token {i} became {n} image tokens")
            out_l += [IGNORE] * n
            out_s += [IGNORE] * n
            i, j = i + m, j + n
            continue
        if j >= len(expanded) or expanded[j] != ids[i]:
            got = expanded[j] if j < len(expanded) else "end of sequence"
            raise AlignmentError(f"item {ident}: the processor's token {j} is {got}, the pre-tokenised token {i} is {ids[i]}")
        out_l.append(labels[i])
        out_s.append(skills[i])
        i, j = i + 1, j + 1
    if j != len(expanded):
        raise AlignmentError(f"item {ident}: the processor produced {len(expanded) - j} extra token(s) at the end")
    return out_l, out_s


class SkillCollator:
    """Batch items of `build_skill_dataset` for a LLaVA-style or Qwen2-VL-style processor (or a tokenizer).

    Returns the processor's tensors (input_ids, attention_mask, pixel_values, image_grid_thw, ...) plus
    ``labels`` and ``skill_labels`` (B, T) aligned with the expanded input_ids. Region items get their box drawn
    as a red rectangle (line width 2, CODA-LM's official encoding) when `draw_boxes`.
    """

    def __init__(self, processor, *, draw_boxes: bool = True, box_color=(255, 0, 0), box_width: int = 2, plan: bool = False):
        self.processor = processor
        self.plan = plan
        self.draw_boxes = draw_boxes
        self.box_color = tuple(box_color)
        self.box_width = box_width

    def load_image(self, path: str, box: Sequence[float] | None = None):
        from PIL import Image, ImageDraw

        with Image.open(path) as im:
            im = im.convert("RGB")
        if self.draw_boxes and box is not None and len(box) == 4:
            x, y, w, h = (float(v) for v in box)
            ImageDraw.Draw(im).rectangle([x, y, x + w, y + h], outline=self.box_color, width=self.box_width)
        return im

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict:
        import torch

        texts = [f["text"] for f in features]
        img_id = image_token_id(self.processor)
        if img_id is not None:
            images = [self.load_image(p, f.get("box")) for f in features for p in (f.get("images") or [])]
            enc = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt", add_special_tokens=False)
        else:
            enc = tokenizer_of(self.processor)(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        batch = dict(enc)
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(input_ids, IGNORE)
        skills = torch.full_like(input_ids, IGNORE)
        for b, f in enumerate(features):
            pos = torch.nonzero(mask[b], as_tuple=True)[0]
            lab, sk = expand_over_images(f["input_ids"], f["labels"], f["skill_labels"], input_ids[b, pos].tolist(), img_id, f.get("item_id", str(b)))
            labels[b, pos] = torch.tensor(lab, dtype=labels.dtype)
            skills[b, pos] = torch.tensor(sk, dtype=skills.dtype)
        batch["labels"] = labels
        batch["skill_labels"] = skills
        if self.plan:
            batch.update(self._plan_inputs(features, labels, mask))
        return batch

    @staticmethod
    def _plan_inputs(features, labels, mask) -> dict:
        import torch

        from mose.skill_format import NUM_POSES
        from mose.trajectory_decoders import prompt_ego_speed, trajectory_target

        n = len(features)
        speed = torch.full((n,), float("nan"))
        index = torch.full((n,), -1, dtype=torch.long)
        targets = torch.full((n, NUM_POSES, 2), float("nan"))
        for b, f in enumerate(features):
            v = prompt_ego_speed(f.get("prompt", ""))
            xy = trajectory_target(f.get("target", ""))
            answer = torch.nonzero((labels[b] != IGNORE) & mask[b].bool(), as_tuple=True)[0]
            if not np.isfinite(v) or xy is None or not len(answer) or int(answer[0]) < 1:
                continue
            speed[b], index[b] = float(v), int(answer[0]) - 1  # the last prompt token
            targets[b] = torch.as_tensor(xy, dtype=targets.dtype)
        return {"ego_speed": speed, "plan_index": index, "plan_targets": targets}
