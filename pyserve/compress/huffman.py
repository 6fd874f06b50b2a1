"""Huffman coding of the stored symbol streams (Deep Compression, section 4): the codebook indices
and the relative-index gaps of every sparse layer are entropy coded with the native canonical
Huffman coder (:func:`pyserve.ops.huffman_encode`) when the artifact is written."""

from __future__ import annotations

from dataclasses import dataclass

from pyserve.compress.methods import CompressionState, register


@dataclass(frozen=True)
class HuffmanConfig:
    """No options yet: every sparse layer's gap and codebook-index streams are Huffman coded."""


@register("huffman", HuffmanConfig)
def huffman(state: CompressionState, cfg: HuffmanConfig, task) -> dict:
    state.entropy = "huffman"
    return {}
