"""The ``torch.nn.Module`` :func:`pyserve.load` returns for an artifact with a text input
(:mod:`pyserve.artifact.text`); kept apart so that reading a manifest never imports torch."""

from __future__ import annotations

from typing import Sequence

import torch

from pyserve.artifact.text import TextInput, Tokenize, decode_sentences, is_text

__all__ = ["TextModel"]


class TextModel(torch.nn.Module):
    """An artifact's graph (token-id inputs) behind its stored tokenizer.

    ``forward`` takes either

    * sentences — one ``str``, a list of ``str`` / UTF-8 ``bytes``, or a 1-D numpy BYTES (object)
      array: tokenized by the stored tokenizer (truncated to ``text.max_length`` tokens, padded to
      the longest), then the graph runs; returns its output, e.g. float32 ``[len(sentences), 384]``;
    * the graph's own inputs (e.g. ``input_ids``, ``attention_mask``, int64 ``[B, S]``), passed
      through unchanged.

    Raises ValueError for no sentences or an element that is not UTF-8 text.

    Attributes: ``graph`` (the artifact's module), ``text`` (:class:`~pyserve.artifact.text.TextInput`),
    ``tokenize`` (:class:`~pyserve.artifact.text.Tokenize`), ``input_names`` (graph inputs in order).
    """

    def __init__(self, graph: torch.nn.Module, text: TextInput, input_names: Sequence[str]):
        super().__init__()
        missing = [n for n in input_names if n not in text.feeds]
        if missing:
            raise ValueError(f"text section feeds {sorted(text.feeds)}, but graph inputs {missing} are not fed")
        self.graph = graph
        self.text = text
        self.tokenize = Tokenize(text)
        self.input_names = tuple(input_names)

    def token_inputs(self, sentences) -> tuple[torch.Tensor, ...]:
        """The graph's inputs for ``sentences`` (int64 ``[B, S]`` tensors in graph input order)."""
        sentences = [sentences] if isinstance(sentences, str) else decode_sentences(sentences, self.text.name)
        if not sentences:
            raise ValueError(f"{self.text.name}: no sentences given")
        feeds = self.tokenize(sentences)
        return tuple(torch.from_numpy(feeds[n]) for n in self.input_names)

    def forward(self, *args):
        if len(args) == 1 and is_text(args[0]):
            args = self.token_inputs(args[0])
        return self.graph(*args)
