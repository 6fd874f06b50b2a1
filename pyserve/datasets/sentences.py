"""Sentence data for the sentence-embedding examples, all on local disk.

``sentence_pairs()``: 103 English sentence pairs written for pyserve (``sentence_pairs.tsv`` beside
this file), each with a graded similarity score from 0 (unrelated) to 5 (same meaning), in the
style of the STS benchmark (Cer et al. 2017, "SemEval-2017 Task 1"): paraphrases, related
sentences on the same topic, and unrelated ones. Quality of an embedding model is the Spearman
correlation between its cosine similarities and these scores (or another model's similarities).

``transfer_sentences(n)``: real English sentences that need no labels, for distillation and
calibration: the prose of Python's own reference documentation as shipped with every CPython
(``pydoc_data.topics``), split into sentences, deterministic for a Python version. They are
disjoint from the pair set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SentencePairs", "sentence_pairs", "transfer_sentences"]

_PAIRS = Path(__file__).with_name("sentence_pairs.tsv")


@dataclass(frozen=True)
class SentencePairs:
    """``first[i]`` and ``second[i]`` (str) with ``scores[i]`` (float32, 0..5)."""

    first: tuple[str, ...]
    second: tuple[str, ...]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def sentence_pairs() -> SentencePairs:
    """The project's sentence-pair set (see the module docstring)."""
    first, second, scores = [], [], []
    for lineno, line in enumerate(_PAIRS.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{_PAIRS}:{lineno}: expected 'score<TAB>sentence<TAB>sentence'")
        scores.append(float(parts[0]))
        first.append(parts[1].strip())
        second.append(parts[2].strip())
    return SentencePairs(tuple(first), tuple(second), np.asarray(scores, dtype=np.float32))


def transfer_sentences(n: int | None = None, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Up to ``n`` (all when None) English prose sentences from Python's reference documentation
    (``pydoc_data.topics``), in a fixed order: lines that look like code or grammar are dropped,
    sentences of ``min_words`` to ``max_words`` words are kept, duplicates removed."""
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        paragraphs = re.split(r"\n\s*\n", topics[key])
        for para in paragraphs:
            lines = para.splitlines()
            if not lines or any(ln.startswith("   ") for ln in lines) or any(c in para for c in "*=>"):
                continue
            text = " ".join(ln.strip() for ln in lines)
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = sent.split()
                if min_words <= len(words) <= max_words and sent.endswith(".") and sent not in seen:
                    seen.add(sent)
                    out.append(sent)
                    if n is not None and len(out) >= n:
                        return out
    return out
