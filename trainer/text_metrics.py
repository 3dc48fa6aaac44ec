"""Text metrics for generated answers against references: exact match, BLEU (sacrebleu), ROUGE-L (rouge-score).

Chinese has no spaces, and rouge-score's default tokenizer keeps only [a-z0-9] runs, so Chinese text would score
nothing. As PaddleNLP does for its generation eval, CJK text is tokenized per character: BLEU with sacrebleu's
`zh` tokenizer (each CJK character a token, the rest by 13a) whenever a reference contains CJK, ROUGE-L with a
tokenizer that makes each CJK character a token and lowercases words elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Metric = Literal["em", "bleu", "rougeL"]
METRICS: tuple[Metric, ...] = ("em", "bleu", "rougeL")

# CJK Unified Ideographs (+ extension A, compatibility), CJK punctuation, full-width forms, kana, hangul.
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_CJK_RE = re.compile(f"[{_CJK}]")
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


def parse_metrics(spec: str | Sequence[str]) -> list[Metric]:
    """'em,bleu,rougeL' -> the metric names, in order; unknown names are an error listing the known ones."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    lookup = {m.lower(): m for m in METRICS}
    out: list[Metric] = []
    for name in names:
        if name.lower() not in lookup:
            raise ValueError(f"unknown metric {name!r} (choose from {', '.join(METRICS)})")
        out.append(lookup[name.lower()])
    return out


def has_cjk(text: str) -> bool:
    return _CJK_RE.search(text) is not None


def tokenize(text: str) -> list[str]:
    """CJK characters one token each; other text split on spaces, lowercased, edge punctuation removed."""
    out = []
    for tok in _TOKEN_RE.findall(text.lower()):
        if not _CJK_RE.fullmatch(tok):
            tok = _EDGE_PUNCT.sub("", tok)
        if tok:
            out.append(tok)
    return out


class _RougeTokenizer:
    """The object rouge-score's RougeScorer calls (`tokenize(text) -> list[str]`)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (0-100) with sacrebleu; per-character for CJK."""
    import sacrebleu

    tokenizer = "zh" if any(has_cjk(r) for r in references) else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenizer).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-pair ROUGE-L F1 (0-1) with rouge-score's LCS, on `tokenize`'s tokens."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]


def score(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[Metric] = METRICS
          ) -> dict[str, float]:
    """Corpus-level scores: em (fraction exact), bleu (0-100), rougeL (mean F1, 0-1), over pairs with a
    reference. Metrics of an empty set are 0."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    out: dict[str, float] = {}
    n = len(references)
    for m in metrics:
        if n == 0:
            out[m] = 0.0
        elif m == "em":
            out[m] = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n
        elif m == "bleu":
            out[m] = bleu(predictions, references)
        else:
            out[m] = sum(rouge_l(predictions, references)) / n
    return out
