"""The sentence-embedding task (recipe ``data: {dataset: sentence-pairs, tokenizer: ...}``).

The model takes ``input_ids`` and ``attention_mask`` (int64 ``[B, S]``, both dims dynamic) and
returns one embedding per sentence (float32 ``[B, D]``). Quality (:meth:`SentenceTask.evaluate`) is
the Spearman rank correlation between the model's cosine similarities of the pairs in
:func:`pyserve.datasets.sentence_pairs` and the pairs' human scores; :meth:`SentenceTask.details`
adds the correlation with the fp32 (teacher) model's similarities and the cosine between each
sentence's embedding and the fp32 one. Unlabelled transfer sentences
(:func:`pyserve.datasets.transfer_sentences`) feed calibration and distillation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

__all__ = ["SentenceTask", "spearman"]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (Pearson of average ranks)."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


@dataclass
class SentenceTask:
    """Sentence pairs for evaluation, transfer sentences for calibration and distillation.

    ``tokenizer``: a callable like Hugging Face's (``tok(list[str], padding=True, truncation=True,
    max_length=..., return_tensors="pt")`` giving ``input_ids`` and ``attention_mask``).
    """

    tokenizer: object
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-5
    seed: int = 0
    verbose: bool = True
    transfer: int | None = None          # how many transfer sentences (None = all)
    transfer_sets: tuple = ("pydoc",)     # their sources (pyserve.datasets.TRANSFER_SETS), in order
    metric = "Spearman vs pair scores"
    dynamic_axes = ((0, 1), (0, 1))
    _reference: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        from pyserve.datasets import sentence_pairs, transfer_sentences

        self.pairs = sentence_pairs()
        sentences = sorted(set(self.pairs.first) | set(self.pairs.second))
        self.eval_sentences = sentences
        index = {s: i for i, s in enumerate(sentences)}
        self._a = np.array([index[s] for s in self.pairs.first])
        self._b = np.array([index[s] for s in self.pairs.second])
        self.train_sentences = transfer_sentences(self.transfer, sets=tuple(self.transfer_sets))
        # distillation learns from the teacher only: no labels
        self.train_y = None

    def log(self, msg: str) -> None:
        if self.verbose:
            tqdm.write(msg, file=sys.stderr)

    def encode(self, sentences) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, int64 [B, S] (padded to the longest, truncated to max_length)."""
        out = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return out["input_ids"].to(torch.int64), out["attention_mask"].to(torch.int64)

    def text_input(self, input_names):
        """The tokenizer to store in the artifact (:class:`pyserve.artifact.TextInput`, truncating at
        ``max_length`` as evaluation did), or None (with a log line) for a tokenizer that is not a
        Hugging Face fast tokenizer or graph inputs that are not tokenizer outputs."""
        from pyserve.artifact.text import text_input_from_hf

        try:
            return text_input_from_hf(self.tokenizer, input_names, self.max_length)
        except ValueError as exc:
            self.log(f"pyserve compress: no text input in the artifact: {exc}")
            return None

    def example_inputs(self, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(self.eval_sentences[:n])

    def embed(self, model: nn.Module, sentences=None) -> np.ndarray:
        """float32 [len(sentences), D] embeddings (the evaluation sentences by default)."""
        sentences = self.eval_sentences if sentences is None else sentences
        try:
            if hasattr(model, "eval"):
                model.eval()
        except NotImplementedError:  # graphs rebuilt by torch.export are in eval mode already
            pass
        outs = []
        with torch.inference_mode():
            for i in range(0, len(sentences), self.eval_batch_size):
                outs.append(model(*self.encode(sentences[i:i + self.eval_batch_size])).float().numpy())
        return np.concatenate(outs)

    def similarities(self, emb: np.ndarray) -> np.ndarray:
        a, b = emb[self._a], emb[self._b]
        return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)

    def evaluate(self, model: nn.Module) -> float:
        return spearman(self.similarities(self.embed(model)), self.pairs.scores)

    def set_reference(self, model: nn.Module) -> None:
        self._reference = self.embed(model)

    def details(self, model: nn.Module) -> dict:
        """``spearman_scores`` (vs the pair scores), ``spearman_teacher`` (vs the fp32 model's
        similarities), ``cosine_to_fp32_mean`` / ``_min`` (per-sentence embedding cosine)."""
        emb = self.embed(model)
        out = {"spearman_scores": spearman(self.similarities(emb), self.pairs.scores)}
        if self._reference is not None:
            ref = self._reference
            out["spearman_teacher"] = spearman(self.similarities(emb), self.similarities(ref))
            cos = (emb * ref).sum(1) / np.maximum(np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
            out["cosine_to_fp32_mean"] = float(cos.mean())
            out["cosine_to_fp32_min"] = float(cos.min())
        return out

    def check_outputs(self, outs: tuple, declared: int, dataset: str) -> str | None:
        if outs[0].dim() != 2:
            return f"the model returns shape {list(outs[0].shape)}; a sentence embedding needs [-1, D]"
        return None

    def calibration_batches(self, n: int, batch_size: int = 16):
        sents = self.train_sentences[:n]
        return [self.encode(sents[i:i + batch_size]) for i in range(0, len(sents), batch_size)]

    def train_batches(self, epoch: int):
        """(inputs tuple, None) over the transfer sentences, shuffled by seed and epoch."""
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(len(self.train_sentences))
        for i in range(0, len(order), self.batch_size):
            yield self.encode([self.train_sentences[j] for j in order[i:i + self.batch_size]]), None
