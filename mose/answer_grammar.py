"""Constrained decoding of the step-by-step answer (mose/skill_format.py), and generation budgets from the data.

Every answer decoded through `AnswerConstraint` parses with `mose.skill_format.parse_answer` without an error and
with 8 poses, whatever the model's weights (an untrained model included), within the token budget it is given.

The grammar (over bytes; structure in ASCII, free text may hold any UTF-8 bytes)::

    answer   := section(root_1) "\\n" section(root_2) "\\n" ... section(root_n)          every root, taxonomy order
    section  := "<" root ">\\n" line* [traj_line] "</" root ">"                          traj_line only (and always,
    line     := "[" skill "] " text "\\n"                                                last) in the trajectory's root
    skill    := a descendant of the section's root in the taxonomy, not the trajectory
    text     := 1..line_cap bytes, none of "\\n", "<", control bytes (< 0x20, 0x7f); the first not a space
    traj_line:= "[trajectory] [" pose (", " pose){7} "]\\n"
    pose     := "(" number ", " number ")"
    number   := "-"? ("0" | [1-9][0-9]{0,int_digits-1}) ("." [0-9]{1,2})?                |value| < 10**int_digits

then the end-of-turn token. `<` never occurs in text, so no tag can start inside a line; a line always starts with
`[skill] `, so free text never reads as a fine tag; the trajectory is the first (and only) `[trajectory]` line.

Budget: `cost(state)` is the length in bytes of the shortest completion from a state (the answer's end included).
A token is allowed only when `cost(state after it) <= budget left after it`. Every byte of a shortest completion
has a single-byte token (checked when the constraint is built), so from a state with `cost <= budget left` the
single-byte token of the completion's next byte always stays allowed: the invariant holds to the end, and an answer
that starts within budget always ends with a full trajectory and closed tags. Counting bytes rather than tokens
makes the steering conservative: it starts when the budget left equals the completion spelled one byte per token
(for a fresh answer with the packaged taxonomy, `min_answer_bytes()` = 154 bytes), earlier than a
token-exact bound would. Budgets computed from the data (`answer_budget`) leave a correct answer room enough never
to meet it.

Token level: the vocabulary's byte strings go into a byte trie (byte-level BPE tokens are mapped back through
GPT-2's byte alphabet; other tokenizers through `decode`); a state's allowed tokens, the states they lead to and
those states' costs come from one walk of the trie from that state, cached per state; free text is tabled once per
section for every line length (a token of k text bytes moves the length by k), so a large vocabulary is not walked
once per length. The processor
(`AnswerLogitsProcessor`, a transformers `LogitsProcessor`) advances each row's state by the token chosen at the
last step, works with greedy `generate`, batches (left padding) and the KV cache, and leaves rows that have
finished alone.

Why not a grammar library: outlines-core 0.2.14, llguidance 1.9.1 and xgrammar 0.2.9 all install here as
wheels (1-3 MB, native code), but each would be a new compiled dependency of the package, and none exposes the
distance-to-acceptance of a state, which is what forcing the answer to finish within the budget needs. The
grammar is small (a few dozen state kinds), so a byte automaton of our own with cached masks is used instead.

Budgets (`longest_target_tokens`, `answer_budget`): the longest planning target of the training data in tokens
(its end-of-turn token included) plus a margin (25 %, at least 32 tokens); a configured cap may lower it, with a
warning when the cap is below the longest target (a correct answer would then be cut or steered short).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

from common.errors import MoseError
from mose.skill_format import NUM_POSES, TRAJECTORY_SKILL
from mose.skills import Taxonomy

LINE_CAP = 240  # bytes of free text per line (the longest fine line of the simulator corpus is well below)
INT_DIGITS = 3  # integer digits of a trajectory number: |x|, |y| < 1000 m
FRAC_DIGITS = 2
TEXT_DEFAULT = ord(".")  # the free-text byte of a shortest completion


class AnswerGrammarError(MoseError, ValueError):
    """The constraint cannot be built or run (a tokenizer without the needed tokens, a budget below the shortest answer)."""


# ----------------------------------------------------------------------------------------------
# the byte automaton
#
# States are tuples (hashable, cached):
#   ("lit", text_id, pos, nxt)    inside the fixed literal LITS[text_id] at byte pos; nxt: the state after it
#   ("line", i)                   at the start of a line in section i (before the trajectory in its section)
#   ("skill", i, prefix)          inside "[...": prefix typed so far
#   ("text", i, n)                n bytes of free text typed in section i
#   ("num", p, c, phase, d)       trajectory pose p (0..7), component c (0 = x, 1 = y), number phase, digits so far
#   ("end",)                      the answer is complete: only the end-of-turn token


_DIGITS = frozenset(b"0123456789")
_NONZERO = frozenset(b"123456789")


def _text_byte(b: int, first: bool) -> bool:
    if b < 0x20 or b == 0x7F or b == ord("<"):
        return False
    return not (first and b == ord(" "))


class AnswerGrammar:
    """The byte automaton of the answer for a taxonomy (module doc). `step`, `cost`, `default` per state."""

    def __init__(self, taxonomy: Taxonomy, *, num_poses: int = NUM_POSES, line_cap: int = LINE_CAP,
                 int_digits: int = INT_DIGITS):
        tax = taxonomy
        if line_cap < 1 or int_digits < 1 or num_poses < 1:
            raise AnswerGrammarError(f"AnswerGrammar: line_cap, int_digits and num_poses must be >= 1, got {line_cap}, {int_digits}, {num_poses}")
        if TRAJECTORY_SKILL not in tax:
            raise AnswerGrammarError(f"{tax.source}: the taxonomy has no {TRAJECTORY_SKILL!r} skill; the answer grammar needs it")
        self.roots = list(tax.roots)
        self.traj_root = self.roots.index(tax.root_of(TRAJECTORY_SKILL))
        self.skills = [tuple(s for s in tax.descendants(r) if s != TRAJECTORY_SKILL) for r in self.roots]
        self.num_poses, self.line_cap, self.int_digits = num_poses, line_cap, int_digits
        self._lits: list[bytes] = []
        self._lit_ids: dict[bytes, int] = {}
        self._cost: dict[tuple, int] = {("end",): 0}

    # literals ------------------------------------------------------------------------------
    def _lit(self, text: str, nxt: tuple) -> tuple:
        b = text.encode()
        if b not in self._lit_ids:
            self._lit_ids[b] = len(self._lits)
            self._lits.append(b)
        return ("lit", self._lit_ids[b], 0, nxt)

    def start(self) -> tuple:
        return self._open(0)

    def _open(self, i: int) -> tuple:
        return self._lit(("\n" if i else "") + f"<{self.roots[i]}>\n", ("line", i) if self.skills[i] or i == self.traj_root else self._close(i))

    def _close(self, i: int) -> tuple:
        return self._lit(f"</{self.roots[i]}>", self._open(i + 1) if i + 1 < len(self.roots) else ("end",))

    def _after_number(self, p: int, c: int) -> tuple:
        """The literal after number c of pose p, then the next number (or the section's close)."""
        if c == 0:
            return self._lit(", ", ("num", p, 1, "start", 0))
        if p + 1 < self.num_poses:
            return self._lit("), (", ("num", p + 1, 0, "start", 0))
        return self._lit(")]\n", self._close(self.traj_root))

    # transitions ---------------------------------------------------------------------------
    def step(self, s: tuple, b: int) -> tuple | None:
        """The state after byte `b`, or None when the grammar does not allow it."""
        kind = s[0]
        if kind == "lit":
            lit = self._lits[s[1]]
            if lit[s[2]] != b:
                return None
            return s[3] if s[2] + 1 == len(lit) else ("lit", s[1], s[2] + 1, s[3])
        if kind == "line":
            i = s[1]
            if b == ord("["):
                return ("skill", i, "")
            if b == ord("<") and i != self.traj_root:  # the close tag, its "<" read
                c = self._close(i)
                return ("lit", c[1], 1, c[3])
            return None
        if kind == "skill":
            i, prefix = s[1], s[2]
            names = self.skills[i] + ((TRAJECTORY_SKILL,) if i == self.traj_root else ())
            if b == ord("]"):
                if prefix == TRAJECTORY_SKILL and i == self.traj_root:
                    return self._lit(" [(", ("num", 0, 0, "start", 0))
                if prefix in self.skills[i]:
                    return self._lit(" ", ("text", i, 0))
                return None
            ext = prefix + chr(b) if b < 0x80 else None
            if ext is not None and any(n.startswith(ext) for n in names):
                return ("skill", i, ext)
            return None
        if kind == "text":
            i, n = s[1], s[2]
            if b == ord("\n"):
                return ("line", i) if n >= 1 else None
            if n < self.line_cap and _text_byte(b, n == 0):
                return ("text", i, n + 1)
            return None
        if kind == "num":
            p, c, phase, d = s[1:]
            term = ord(",") if c == 0 else ord(")")
            if phase == "start" and b == ord("-"):
                return ("num", p, c, "sign", 0)
            if phase in ("start", "sign"):
                if b == ord("0"):
                    return ("num", p, c, "int0", 1)
                return ("num", p, c, "int", 1) if b in _NONZERO else None
            if phase in ("int0", "int"):
                if phase == "int" and b in _DIGITS and d < self.int_digits:
                    return ("num", p, c, "int", d + 1)
                if b == ord("."):
                    return ("num", p, c, "dot", 0)
                return self.step(self._after_number(p, c), b) if b == term else None
            if phase == "dot":
                return ("num", p, c, "frac", 1) if b in _DIGITS else None
            if phase == "frac":
                if b in _DIGITS and d < FRAC_DIGITS:
                    return ("num", p, c, "frac", d + 1)
                return self.step(self._after_number(p, c), b) if b == term else None
            return None
        return None  # "end": only the end-of-turn token

    def default(self, s: tuple) -> int:
        """The next byte of the shortest completion from `s`."""
        kind = s[0]
        if kind == "lit":
            return self._lits[s[1]][s[2]]
        if kind == "line":
            return ord("[") if s[1] == self.traj_root else ord("<")
        if kind == "skill":
            i, prefix = s[1], s[2]
            if i == self.traj_root and TRAJECTORY_SKILL.startswith(prefix):  # on the way to the trajectory
                return ord("]") if prefix == TRAJECTORY_SKILL else ord(TRAJECTORY_SKILL[len(prefix)])
            return self._skill_default(i, prefix)
        if kind == "text":
            return ord("\n") if s[2] >= 1 else TEXT_DEFAULT
        if kind == "num":
            phase = s[3]
            if phase in ("start", "sign", "dot"):
                return ord("0")
            return ord(",") if s[2] == 0 else ord(")")
        raise AnswerGrammarError("the answer is complete: no byte follows")

    def _skill_default(self, i: int, prefix: str) -> int:
        names = sorted((n for n in self.skills[i] if n.startswith(prefix)), key=lambda n: (len(n), n))
        if not names:
            raise AnswerGrammarError(f"no skill of <{self.roots[i]}> starts with {prefix!r}")
        n = names[0]
        return ord("]") if n == prefix else ord(n[len(prefix)])

    def cost(self, s: tuple) -> int:
        """Bytes of the shortest completion from `s` (0 for a complete answer), by following `default`."""
        path = []
        while s not in self._cost:
            path.append(s)
            s = self.step(s, self.default(s))
            if s is None:  # a default that the grammar refuses would be a bug here, not bad input
                raise AssertionError(f"default byte refused in state {path[-1]}")
        c = self._cost[s]
        for t in reversed(path):
            c += 1
            self._cost[t] = c
        return self._cost[path[0]] if path else c

    def completion(self, s: tuple) -> bytes:
        """The shortest completion from `s`."""
        out = bytearray()
        while s != ("end",):
            b = self.default(s)
            out.append(b)
            s = self.step(s, b)
        return bytes(out)

    def accepts(self, text: str | bytes) -> tuple | None:
        """The state after `text` from the start (None when the grammar refuses a byte of it)."""
        s = self.start()
        for b in text.encode() if isinstance(text, str) else text:
            s = self.step(s, b)
            if s is None:
                return None
        return s

    def min_answer_bytes(self) -> int:
        return self.cost(self.start())


# ----------------------------------------------------------------------------------------------
# token level


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> unicode alphabet of byte-level BPE, inverted (character -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    import json

    dec = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", []) or []}
    return "ByteLevel" in kinds


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each token id's bytes (None for special / added tokens, which the grammar never allows inside an answer)."""
    n = len(tokenizer)
    special = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    out: list[bytes | None] = [None] * n
    if _is_byte_level(tokenizer):
        dec = _byte_decoder()
        for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
            if i in special or tok is None:
                continue
            try:
                out[i] = bytes(dec[ch] for ch in tok)
            except KeyError:
                out[i] = None
        return out
    for i in range(n):  # other tokenizers: each token decoded alone (tokens that are partial characters are left out)
        if i in special:
            continue
        s = tokenizer.decode([i])
        out[i] = s.encode() if s and "\ufffd" not in s else None
    return out


class _Trie:
    __slots__ = ("kids", "ids")

    def __init__(self):
        self.kids: dict[int, _Trie] = {}
        self.ids: list[int] = []


@dataclass
class _Mask:
    ids: "object"  # torch.LongTensor of allowed token ids
    costs: "object"  # torch.LongTensor, the cost of the state each leads to
    nxt: dict  # token id -> state


class AnswerConstraint:
    """The answer grammar for one tokenizer: per-state token masks (cached) and `logits_processor(budget)`.

    `eos_token_ids`: the tokens that end the answer (default the tokenizer's eos token).
    """

    def __init__(self, tokenizer, taxonomy: Taxonomy, *, eos_token_ids: Sequence[int] | None = None,
                 line_cap: int = LINE_CAP, int_digits: int = INT_DIGITS, num_poses: int = NUM_POSES):
        self.grammar = AnswerGrammar(taxonomy, num_poses=num_poses, line_cap=line_cap, int_digits=int_digits)
        eos = list(eos_token_ids) if eos_token_ids is not None else [tokenizer.eos_token_id]
        if not eos or any(e is None for e in eos):
            raise AnswerGrammarError("AnswerConstraint: the tokenizer has no eos token; pass eos_token_ids")
        self.eos = eos
        self.vocab = token_bytes(tokenizer)
        self.vocab_size = len(self.vocab)
        self._root = _Trie()
        single: dict[int, int] = {}
        for i, b in enumerate(self.vocab):
            if not b:
                continue
            node = self._root
            for x in b:
                node = node.kids.setdefault(x, _Trie())
            node.ids.append(i)
            if len(b) == 1:
                single.setdefault(b[0], i)
        g = self.grammar
        needed = set(g.completion(g.start())) | {TEXT_DEFAULT, ord("0"), ord(","), ord(")"), ord("]"), ord("\n"), ord(" ")}
        for i, names in enumerate(g.skills):
            needed |= {b for n in names for b in n.encode()}
        missing = sorted(chr(b) for b in needed if b not in single)
        if missing:
            raise AnswerGrammarError(f"AnswerConstraint: the tokenizer has no single-byte token for {missing}; "
                                     "the forced completion needs one for every byte of the answer's structure")
        self._masks: dict[tuple, _Mask] = {}
        self._texts: dict[int, tuple] = {}

    def mask(self, state: tuple) -> _Mask:
        """All tokens allowed from `state` (budget aside), the states they lead to and those states' costs (cached).

        Free text past its first byte goes through `_text_table` instead (`allowed`, `advance`)."""
        m = self._masks.get(state)
        if m is not None:
            return m
        import torch

        g = self.grammar
        nxt: dict[int, tuple] = {}
        if state == ("end",):
            nxt = {e: ("end",) for e in self.eos}
        else:
            stack = [(self._root, state)]
            while stack:
                node, s = stack.pop()
                for b, child in node.kids.items():
                    t = g.step(s, b)
                    if t is None:
                        continue
                    for i in child.ids:
                        nxt[i] = t
                    if child.kids and t != ("end",):
                        stack.append((child, t))
        ids = sorted(nxt)
        m = _Mask(torch.tensor(ids, dtype=torch.long), torch.tensor([g.cost(nxt[i]) for i in ids], dtype=torch.long), nxt)
        self._masks[state] = m
        return m

    def _text_table(self, i: int):
        """Free text of section i after its first byte, for every n at once (one walk per section, not per length).

        A token is either all text bytes (k of them: from ("text", i, n) it leads to ("text", i, n + k), allowed while
        n + k <= line_cap; cost 1 + cost(line start) whatever n) or k text bytes, a newline and a rest walked from the
        line start (the state after it does not depend on n). Returns (pure ids, pure k, pure cost, exit ids, exit k,
        exit costs, {token: (k, state or None)})."""
        tab = self._texts.get(i)
        if tab is not None:
            return tab
        import torch

        g = self.grammar
        line = ("line", i)
        pure, exits, look = [], [], {}
        for tid, b in enumerate(self.vocab):
            if not b:
                continue
            k = b.find(b"\n")
            body = b if k < 0 else b[:k]
            if not all(_text_byte(x, False) for x in body):
                continue
            if k < 0:
                pure.append((tid, len(body)))
                look[tid] = (len(body), None)
                continue
            st = line
            for x in b[k + 1:]:
                st = g.step(st, x)
                if st is None:
                    break
            if st is not None:
                exits.append((tid, k, st))
                look[tid] = (k, st)
        text_cost = g.cost(("text", i, 1))  # = 1 + cost(line start): every n >= 1 alike
        tab = (torch.tensor([t for t, _ in pure], dtype=torch.long), torch.tensor([k for _, k in pure], dtype=torch.long), text_cost,
               torch.tensor([t for t, _, _ in exits], dtype=torch.long), torch.tensor([k for _, k, _ in exits], dtype=torch.long),
               torch.tensor([g.cost(st) for _, _, st in exits], dtype=torch.long), look)
        self._texts[i] = tab
        return tab

    def allowed(self, state: tuple, left: int):
        """Token ids allowed from `state` with `left` tokens left after this one (a LongTensor)."""
        import torch

        if state[0] == "text" and state[2] >= 1:
            pure_ids, pure_k, text_cost, exit_ids, exit_k, exit_cost, _ = self._text_table(state[1])
            room = self.grammar.line_cap - state[2]
            keep = exit_ids[(exit_k <= room) & (exit_cost <= left)]
            if text_cost <= left:
                keep = torch.cat([pure_ids[pure_k <= room], keep])
            return keep
        m = self.mask(state)
        return m.ids[m.costs <= left]

    def advance(self, state: tuple, token: int) -> tuple | None:
        """The state after `token` (None when the grammar does not allow it)."""
        if state[0] == "text" and state[2] >= 1:
            hit = self._text_table(state[1])[-1].get(token)
            if hit is None or state[2] + hit[0] > self.grammar.line_cap:
                return None
            return ("text", state[1], state[2] + hit[0]) if hit[1] is None else hit[1]
        return self.mask(state).nxt.get(token)

    def min_new_tokens(self) -> int:
        """The smallest budget that always completes an answer (the shortest answer, one byte per token)."""
        return self.grammar.min_answer_bytes()

    def logits_processor(self, max_new_tokens: int) -> "AnswerLogitsProcessor":
        """A fresh processor for one `generate` call with this `max_new_tokens`."""
        if max_new_tokens < self.min_new_tokens():
            raise AnswerGrammarError(f"max_new_tokens {max_new_tokens} is below the shortest complete answer "
                                     f"({self.min_new_tokens()} tokens, one byte each): raise the generation budget")
        return AnswerLogitsProcessor(self, max_new_tokens)


try:  # transformers is a dependency of mose.modeling, but this module stays importable without it
    from transformers import LogitsProcessor as _LogitsProcessor
except ImportError:  # pragma: no cover
    _LogitsProcessor = object


class AnswerLogitsProcessor(_LogitsProcessor):
    """Masks the scores of every row to the tokens the answer grammar allows within the budget left (module doc)."""

    def __init__(self, constraint: AnswerConstraint, max_new_tokens: int):
        self.c = constraint
        self.max_new_tokens = int(max_new_tokens)
        self.prompt_len: int | None = None
        self.states: list[tuple | None] = []  # None: the row has ended (its end-of-turn token was chosen)

    def __call__(self, input_ids, scores):
        import torch

        batch, cur = input_ids.shape
        if self.prompt_len is None:
            self.prompt_len = cur
            self.states = [self.c.grammar.start()] * batch
        elif cur > self.prompt_len:
            last = input_ids[:, -1].tolist()
            for r, s in enumerate(self.states):
                if s is None:
                    continue
                if s == ("end",):
                    self.states[r] = None
                    continue
                t = self.c.advance(s, last[r])
                if t is None:
                    raise AnswerGrammarError(f"row {r}: token {last[r]} is outside the answer grammar "
                                             "(another logits processor or a sampling step overrode the mask?)")
                self.states[r] = t
        left = self.max_new_tokens - (cur - self.prompt_len)  # tokens left, this one included
        out = torch.full_like(scores, float("-inf"))
        for r, s in enumerate(self.states):
            if s is None:
                out[r] = scores[r]
                continue
            ids = self.c.allowed(s, left - 1)
            ids = ids[ids < scores.shape[1]]
            out[r, ids] = scores[r, ids]
        return out


# ----------------------------------------------------------------------------------------------
# budgets from the data


def longest_target_tokens(targets: Iterable[str], tokenizer) -> int:
    """Tokens of the longest target text, its end-of-turn token included (0 for no target)."""
    longest = 0
    for t in targets:
        longest = max(longest, len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1)
    return longest


def answer_budget(longest_target: int, cap: int | None = None, *, margin: float = 0.25, min_margin: int = 32,
                  where: str = "max_new_tokens") -> int:
    """`longest_target` plus a margin (`margin` of it, at least `min_margin` tokens), at most `cap` (a warning
    names `where` when the cap is below the longest target)."""
    if longest_target < 1:
        raise AnswerGrammarError(f"{where}: the longest target has {longest_target} tokens; expected planning targets in the data")
    budget = longest_target + max(int(round(margin * longest_target)), min_margin)
    if cap is not None and cap < budget:
        if cap < longest_target:
            warnings.warn(f"{where}: the cap {cap} is below the longest planning target ({longest_target} tokens): "
                          "correct answers will be steered short", stacklevel=2)
        budget = int(cap)
    return budget


__all__ = ["AnswerGrammar", "AnswerConstraint", "AnswerLogitsProcessor", "AnswerGrammarError", "answer_budget",
           "longest_target_tokens", "token_bytes"]
