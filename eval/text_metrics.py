"""Reference-based text metrics that need no judge: BLEU-4, ROUGE-L, CIDEr-D.

- BLEU-4: `sacrebleu` corpus BLEU (13a tokenisation, exponential smoothing), on its 0-100 scale.
- ROUGE-L: `rouge-score` (Google's package) F-measure of the longest common subsequence, averaged over items,
  0-1 scale, no stemming (its tokeniser lower-cases and keeps only letters and digits).
- CIDEr-D (Vedantam et al., CVPR 2015), implemented here because the reference code (pycocoevalcap) needs Java
  for its tokeniser and is unmaintained. For a candidate c and references S = {s_j}:

      g_n(x)[w] = count_x(w) * log(N / max(1, df(w)))          tf-idf of each n-gram w of length n
      CIDEr-D_n = 1/|S| * sum_j exp(-(len(c) - len(s_j))^2 / (2 sigma^2))
                  * sum_w min(g_n(c)[w], g_n(s_j)[w]) * g_n(s_j)[w] / (|g_n(c)| |g_n(s_j)|)
      CIDEr-D   = 10 * mean over n = 1..4 of CIDEr-D_n            (sigma = 6)

  where N is the number of items in the corpus and df(w) the number of items whose references contain w
  (so idf needs the whole evaluated set: scores depend on the corpus, as in the original). A norm of zero
  (no n-grams of that length) gives 0 for that n. Tokens: lower-cased runs of letters/digits. The corpus score
  is the mean over items, on the usual 0-10 scale (papers often print it x 100).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _as_refs(refs: Sequence) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def _check(hyps: Sequence[str], refs: Sequence) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} predictions but {len(refs)} references; expected one reference (or list) per prediction")


def bleu4(hyps: Sequence[str], refs: Sequence) -> float:
    """Corpus BLEU-4 (0-100). `refs[i]` is one string or a list of strings for `hyps[i]`."""
    import sacrebleu

    _check(hyps, refs)
    if not hyps:
        return float("nan")
    rr = _as_refs(refs)
    width = max(len(r) for r in rr)
    streams = [[r[k] if k < len(r) else None for r in rr] for k in range(width)]  # sacrebleu: one stream per reference slot
    return float(sacrebleu.corpus_bleu(list(hyps), streams).score)


def rouge_l(hyps: Sequence[str], refs: Sequence) -> float:
    """Mean ROUGE-L F-measure (0-1); with several references an item takes its best one."""
    from rouge_score import rouge_scorer

    _check(hyps, refs)
    if not hyps:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(max(scorer.score(r, h)["rougeL"].fmeasure for r in rr) for h, rr in zip(hyps, _as_refs(refs))) / len(hyps)


def _ngrams(words: list[str], n_max: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def cider_d(hyps: Sequence[str], refs: Sequence, n_max: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-item scores), 0-10 scale."""
    _check(hyps, refs)
    if not hyps:
        return float("nan"), []
    ref_tok = [[tokens(r) for r in rr] for rr in _as_refs(refs)]
    ref_counts = [[_ngrams(t, n_max) for t in rr] for rr in ref_tok]
    df = Counter(g for rr in ref_counts for g in set().union(*rr))  # items whose references contain g
    log_n = math.log(float(len(hyps)))

    def vec(counts: Counter):
        v = [dict() for _ in range(n_max)]
        for g, c in counts.items():
            v[len(g) - 1][g] = c * (log_n - math.log(max(1.0, df[g])))
        return v, [math.sqrt(sum(x * x for x in vn.values())) for vn in v]

    scores = []
    for h, rr_tok, rr_counts in zip(hyps, ref_tok, ref_counts):
        h_tok = tokens(h)
        vh, nh = vec(_ngrams(h_tok, n_max))
        total = 0.0
        for r_tok, r_counts in zip(rr_tok, rr_counts):
            vr, nr = vec(r_counts)
            penalty = math.exp(-((len(h_tok) - len(r_tok)) ** 2) / (2 * sigma**2))
            per_n = []
            for n in range(n_max):
                dot = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vh[n].items())
                per_n.append(dot / (nh[n] * nr[n]) * penalty if nh[n] and nr[n] else 0.0)
            total += sum(per_n) / n_max
        scores.append(10.0 * total / max(1, len(rr_tok)))
    return sum(scores) / len(scores), scores
