"""A text input in front of a model's token-id inputs: the tokenizer stored inside the artifact.

An artifact written with ``save(..., text=TextInput(...))`` holds, besides its graph (which takes
token ids), a Hugging Face ``tokenizers`` tokenizer serialized as its own JSON (``tokenizer.json``,
the format of ``tokenizers.Tokenizer.to_str()``; zlib-compressed in blob ``tokenizer``; never a
pickle) and a manifest section ``text`` (docs/artifact.md, "Text input") that says which graph
input receives which part of the tokenizer's encoding. Readers then offer a BYTES input of
sentences:

* :func:`pyserve.load` returns a :class:`pyserve.artifact.TextModel`: ``model(["a sentence", ...])`` tokenizes and
  runs the graph; ``model(input_ids, attention_mask)`` still runs the graph on token ids;
* the server's ``pyserve`` backend serves the BYTES input (``PYSERVE_INPUTS=token_ids`` serves the
  graph's token-id inputs instead).

Tokenization: truncation to ``max_length`` tokens (special tokens included) and padding to the
longest sentence of the call, with the pad id and token stored in the manifest — what
``AutoTokenizer(...)(sentences, padding=True, truncation=True, max_length=max_length)`` gives.
Running a stored tokenizer needs the ``tokenizers`` package (``pip install 'pyserve[text]'``); it is
imported on first use only.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["TEXT_FIELDS", "TOKENIZER_FORMAT", "TextInput", "Tokenize", "decode_sentences", "is_text",
           "text_input_from_hf"]

#: The stored tokenizer's format name in the manifest.
TOKENIZER_FORMAT = "huggingface-tokenizers"
#: Parts of a ``tokenizers.Encoding`` a graph input can be fed with.
TEXT_FIELDS = ("ids", "attention_mask", "type_ids")
#: Bytes a stored tokenizer may inflate to (the WordPiece tokenizer of MiniLM is ~0.7 MB).
_MAX_TOKENIZER_BYTES = 64 << 20


@dataclass(frozen=True)
class TextInput:
    """What an artifact stores to take sentences: the tokenizer and how its output feeds the graph.

    Attributes
    ----------
    tokenizer_json : str
        ``tokenizers.Tokenizer.to_str()`` of the model's tokenizer.
    feeds : mapping of graph input name -> one of :data:`TEXT_FIELDS`; every graph input must be
        fed (e.g. ``{"input_ids": "ids", "attention_mask": "attention_mask"}``).
    max_length : tokens per sentence after truncation, special tokens included; >= 2.
    pad_id, pad_token : what padding appends (BERT: 0, ``"[PAD]"``).
    name : protocol name of the BYTES input (default ``"text"``).
    """

    tokenizer_json: str
    feeds: Mapping[str, str]
    max_length: int
    pad_id: int = 0
    pad_token: str = "[PAD]"
    name: str = "text"

    def __post_init__(self):
        if not isinstance(self.tokenizer_json, str) or not self.tokenizer_json:
            raise ValueError("TextInput: argument 'tokenizer_json' must be a non-empty str (tokenizers' JSON)")
        if not self.feeds:
            raise ValueError("TextInput: argument 'feeds' must name at least one graph input")
        bad = {k: v for k, v in self.feeds.items() if v not in TEXT_FIELDS}
        if bad:
            raise ValueError(f"TextInput: argument 'feeds': {bad} — each value must be one of {TEXT_FIELDS}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"TextInput: argument 'max_length' must be an int >= 2, got {self.max_length!r}")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ValueError(f"TextInput: argument 'pad_id' must be an int >= 0, got {self.pad_id!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TextInput: argument 'name' must be a non-empty str, got {self.name!r}")

    # --- the manifest's "text" section and the tokenizer blob ------------------------------------

    def to_manifest(self, blob: str) -> dict:
        return {"input": {"name": self.name, "datatype": "BYTES", "shape": [-1]},
                "tokenizer": {"format": TOKENIZER_FORMAT, "compression": "zlib", "blob": blob},
                "feeds": dict(self.feeds), "max_length": self.max_length,
                "pad_id": self.pad_id, "pad_token": self.pad_token}

    def blob(self) -> bytes:
        return zlib.compress(self.tokenizer_json.encode("utf-8"), 9)

    @classmethod
    def from_manifest(cls, section, blobs: Mapping[str, bytes], what: str) -> "TextInput":
        """Parse the manifest's ``text`` section (and its tokenizer blob); ValueError naming the field."""
        try:
            inp, tok = section["input"], section["tokenizer"]
            if inp.get("datatype") != "BYTES" or inp.get("shape") != [-1]:
                raise ValueError(f"input must be BYTES [-1], got {inp!r}")
            if tok.get("format") != TOKENIZER_FORMAT or tok.get("compression") != "zlib":
                raise ValueError(f"unknown tokenizer format {tok.get('format')!r} / compression {tok.get('compression')!r}")
            data = blobs[tok["blob"]]
            inflate = zlib.decompressobj()
            raw = inflate.decompress(data, _MAX_TOKENIZER_BYTES)
            if inflate.unconsumed_tail or not inflate.eof:
                raise ValueError(f"tokenizer blob is incomplete or inflates past {_MAX_TOKENIZER_BYTES} bytes")
            text = raw.decode("utf-8")
            json.loads(text)  # is JSON; tokenizers parses it on first use
            return cls(tokenizer_json=text, feeds=dict(section["feeds"]), max_length=section["max_length"],
                       pad_id=section.get("pad_id", 0), pad_token=section.get("pad_token", "[PAD]"),
                       name=inp["name"])
        except (KeyError, TypeError, AttributeError, ValueError, zlib.error, UnicodeDecodeError) as exc:
            raise ValueError(f"{what}: malformed text section: {type(exc).__name__}: {exc}") from None


def text_input_from_hf(tokenizer, input_names: Sequence[str], max_length: int, name: str = "text") -> TextInput:
    """A :class:`TextInput` from a Hugging Face *fast* tokenizer (``tokenizer.backend_tokenizer``).

    ``input_names`` are the graph inputs in order; each must be one of ``input_ids``,
    ``attention_mask``, ``token_type_ids``. Raises ValueError for a slow tokenizer (no
    ``tokenizers`` JSON to store) or an input name that is not a tokenizer output.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(f"text_input_from_hf: {type(tokenizer).__name__} is not a fast tokenizer; only a "
                         f"'tokenizers' tokenizer (tokenizer.json) can be stored in an artifact")
    by_name = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    bad = [n for n in input_names if n not in by_name]
    if bad:
        raise ValueError(f"text_input_from_hf: graph inputs {bad} are not tokenizer outputs {sorted(by_name)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad_token = tokenizer.pad_token if tokenizer.pad_token is not None else "[PAD]"
    return TextInput(tokenizer_json=backend.to_str(), feeds={n: by_name[n] for n in input_names},
                     max_length=int(max_length), pad_id=int(pad_id), pad_token=str(pad_token), name=name)


def decode_sentences(values, what: str = "text") -> list[str]:
    """Sentences from a KServe BYTES input: a 1-D numpy object array of ``bytes`` (UTF-8), or
    ``str`` elements; a list of ``str``/``bytes`` is taken too. Raises ValueError naming the element
    that is not UTF-8 or not text, or an input of another rank."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"{what}: expected a 1-D array of sentences, got shape {list(values.shape)}")
        values = values.tolist()
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (bytes, bytearray, np.bytes_)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{what}: element {i} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        elif not isinstance(v, str):
            raise ValueError(f"{what}: element {i} is {type(v).__name__}, expected UTF-8 bytes or str")
        out.append(str(v))
    return out


class Tokenize:
    """The stored tokenizer, configured as the manifest says; call with sentences.

    ``Tokenize(text)(["a", "b"])`` returns graph input name -> int64 numpy ``[B, S]`` (S = longest
    sentence of the call in tokens, at most ``max_length``). Raises RuntimeError when the
    ``tokenizers`` package is missing, ValueError when the JSON is not a tokenizer.
    """

    def __init__(self, text: TextInput):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError("this artifact holds a tokenizer; running it needs the 'tokenizers' package: "
                               "pip install 'pyserve[text]'") from None
        try:
            tok = Tokenizer.from_str(text.tokenizer_json)
        except Exception as exc:  # tokenizers raises its own Exception type for bad JSON
            raise ValueError(f"the stored tokenizer cannot be read: {exc}") from None
        tok.enable_truncation(max_length=text.max_length)
        tok.enable_padding(pad_id=text.pad_id, pad_token=text.pad_token)
        self.text = text
        self._tok = tok

    def __call__(self, sentences: Sequence[str]) -> dict[str, np.ndarray]:
        encs = self._tok.encode_batch(list(sentences))
        out = {}
        for name, part in self.text.feeds.items():
            rows = [getattr(e, part) for e in encs]
            out[name] = np.asarray(rows, dtype=np.int64).reshape(len(encs), -1)
        return out


def is_text(x) -> bool:
    """True for one ``str``, a list/tuple of ``str``/``bytes``, or a numpy bytes/str/object array."""
    if isinstance(x, str):
        return True
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "OSU"
    return isinstance(x, (list, tuple)) and all(isinstance(v, (str, bytes)) for v in x)
