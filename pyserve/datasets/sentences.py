"""Sentence data for the sentence-embedding examples, all on local disk.

``sentence_pairs()``: 103 English sentence pairs written for pyserve (``sentence_pairs.tsv`` beside
this file), each with a graded similarity score from 0 (unrelated) to 5 (same meaning), in the
style of the STS benchmark (Cer et al. 2017, "SemEval-2017 Task 1"): paraphrases, related
sentences on the same topic, and unrelated ones. Quality of an embedding model is the Spearman
correlation between its cosine similarities and these scores (or another model's similarities).

``transfer_sentences(n)``: real English sentences that need no labels, for distillation and
calibration: the prose of Python's own reference documentation as shipped with every CPython
(``pydoc_data.topics``), split into sentences, deterministic for a Python version. They are
disjoint from the pair set. ``sets=("everyday", "pydoc")`` puts first the 258 everyday sentences
of ``everyday_sentences.txt`` (:func:`everyday_sentences`: written for pyserve, on the pair set's
kind of topics — home, weather, travel, food, work, sport, news — but none of its sentences, and
none sharing more than half its words with one of them), the in-domain transfer text a distilled
sentence model learns the teacher's similarities from (README, "BERT on CPUs").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TRANSFER_SETS", "SentencePairs", "everyday_sentences", "sentence_pairs", "transfer_sentences"]

_PAIRS = Path(__file__).with_name("sentence_pairs.tsv")
_EVERYDAY = Path(__file__).with_name("everyday_sentences.txt")
#: the unlabelled sentence sources :func:`transfer_sentences` can draw from
TRANSFER_SETS = ("pydoc", "everyday")


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


def everyday_sentences() -> list[str]:
    """The 258 everyday English sentences of ``everyday_sentences.txt`` (module docstring), in file order."""
    return [ln.strip() for ln in _EVERYDAY.read_text(encoding="utf-8").splitlines()
            if ln.strip() and not ln.startswith("#")]


def transfer_sentences(n: int | None = None, *, min_words: int = 6, max_words: int = 40,
                       sets: tuple[str, ...] = ("pydoc",)) -> list[str]:
    """Up to ``n`` (all when None) unlabelled English sentences from the sources ``sets`` (names in
    :data:`TRANSFER_SETS`), in the order given, duplicates removed. ``pydoc``: prose sentences from
    Python's reference documentation (``pydoc_data.topics``), in a fixed order: lines that look like
    code or grammar are dropped, sentences of ``min_words`` to ``max_words`` words are kept.
    ``everyday``: :func:`everyday_sentences`. Raises ValueError for an unknown or repeated set name."""
    sets = tuple(sets)
    bad = [x for x in sets if x not in TRANSFER_SETS]
    if bad or not sets or len(set(sets)) != len(sets):
        raise ValueError(f"transfer_sets: expected distinct names from {TRANSFER_SETS}, got {list(sets)}")
    out: list[str] = []
    seen: set[str] = set()
    for name in sets:
        source = _pydoc_sentences(min_words, max_words) if name == "pydoc" else everyday_sentences()
        for sent in source:
            if sent not in seen:
                seen.add(sent)
                out.append(sent)
                if n is not None and len(out) >= n:
                    return out
    return out


def _pydoc_sentences(min_words: int, max_words: int):
    from pydoc_data.topics import topics

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
                    yield sent
