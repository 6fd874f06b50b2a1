"""The ``.pyserve`` artifact: one versioned file holding a model graph and its (compressed) weights.

Write with :func:`save` (plain fp32, or with per-tensor encodings from the compressor); read with
:func:`read_manifest` (signature and stats, no torch needed), :func:`load_artifact` or
:func:`pyserve.load`. The format is documented in docs/artifact.md. Loading never unpickles: the
manifest is JSON, the graph is torch.export's JSON, the weights are pyserve's own encodings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from pyserve import dtypes
from pyserve._version import __version__
from pyserve.artifact._container import FORMAT_VERSION, ArtifactError, read_container, write_container
from pyserve.artifact.encoding import (EncodedTensor, Int8Parts, decode_tensor, encode_int8, encode_raw, encode_sparse,
                                       int8_parts)
from pyserve.artifact.text import TextInput

__all__ = [
    "ArtifactError", "EncodedTensor", "FORMAT_VERSION", "Int8Parts", "LoadedArtifact", "Manifest", "TensorSpec",
    "TextInput", "encode_int8", "encode_raw", "encode_sparse", "int8_parts", "load_artifact", "load_module", "read_manifest", "save",
]


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _str(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of the model: protocol datatype name and shape (-1 = batch dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj, what: str) -> "TensorSpec":
        try:
            spec = cls(_str(obj["name"]), _str(obj["datatype"]), tuple(_int(d) for d in obj["shape"]))
            dtypes.from_name(spec.datatype)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{what}: malformed tensor signature {obj!r}: {exc}") from None
        return spec


@dataclass(frozen=True)
class Manifest:
    """What an artifact holds, read without decoding any weight."""

    format_version: int
    model_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tensors: dict              # tensor name -> stored meta (encoding, shape, sizes)
    stats: dict                # free-form report written by the compressor
    size_bytes: int            # file size
    raw: dict                  # the whole manifest JSON
    #: the BYTES input of sentences in front of the token-id ``inputs`` (manifest section ``text``), if any
    text_input: TensorSpec | None = None


@dataclass(frozen=True)
class LoadedArtifact:
    manifest: Manifest
    module: "object"           # torch.nn.Module (the exported graph with decoded weights)
    int8: dict = field(default_factory=dict)  # tensor name -> Int8Parts, for int8-encoded tensors
    text: TextInput | None = None  # the stored tokenizer and its feeds (manifest section ``text``), if any

    def text_module(self):
        """:class:`pyserve.artifact._textmodel.TextModel` around ``module`` (sentences or token ids in);
        ValueError when the artifact has no text input."""
        if self.text is None:
            raise ValueError(f"artifact {self.manifest.model_name!r} holds no tokenizer (no text input)")
        from pyserve.artifact._textmodel import TextModel

        return TextModel(self.module, self.text, [s.name for s in self.manifest.inputs])


def _manifest_from(raw: dict, path, size: int) -> Manifest:
    what = str(path)
    try:
        text = raw.get("text")
        text_input = None
        if text is not None:
            text_input = TensorSpec.from_json(text["input"], what)
            if text_input.datatype != "BYTES" or text_input.shape != (-1,):
                raise ValueError(f"text.input must be BYTES [-1], got {text['input']!r}")
        return Manifest(
            format_version=_int(raw["format_version"]),
            model_name=_str(raw["model_name"]),
            inputs=tuple(TensorSpec.from_json(t, what) for t in raw["inputs"]),
            outputs=tuple(TensorSpec.from_json(t, what) for t in raw["outputs"]),
            tensors=dict(raw["tensors"]),
            stats=dict(raw.get("stats", {})),
            size_bytes=size,
            raw=raw,
            text_input=text_input,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{what}: malformed manifest: missing or bad field {exc}") from None


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and check an artifact's manifest (all checksums are verified); no torch import.

    Raises :class:`ArtifactError` for a missing, truncated, corrupt or unknown-version file.
    """
    raw, _ = read_container(path)
    return _manifest_from(raw, path, os.path.getsize(path))


def save(path: str | os.PathLike, module, example_inputs: tuple, *, model_name: str,
         input_names: list[str] | None = None, output_names: list[str] | None = None,
         encodings: Mapping[str, EncodedTensor] | None = None, stats: dict | None = None,
         dynamic_axes=None, text: TextInput | None = None) -> Manifest:
    """Capture ``module`` with torch.export and write it as an artifact at ``path`` (atomically).

    Parameters
    ----------
    module : torch.nn.Module, exported in eval mode; dim 0 of every input is the (dynamic) batch.
    example_inputs : tuple of torch.Tensor, one per model input, batch size >= 2.
    model_name : name recorded in the manifest (the server's default model name).
    input_names, output_names : protocol tensor names; default ``input__0``, ``output__0``, ...
    encodings : tensor name (as in ``module.state_dict()``) -> :class:`EncodedTensor` for tensors
        stored compressed; every other tensor is stored ``raw``.
    stats : JSON-safe report stored in the manifest (``pyserve inspect`` prints it).
    dynamic_axes : per input, the dims that vary between calls (``-1`` in the signature); default
        ``(0,)`` for every input (the batch). E.g. ``((0, 1), (0, 1))`` for token ids and attention
        mask ``[B, S]``. Every output's dim 0 is the batch.
    text : :class:`TextInput` — store this tokenizer so that readers also take sentences (a BYTES
        input ``text.name``, shape ``[-1]``) and feed the graph inputs named in ``text.feeds``
        (docs/artifact.md, "Text input"). The graph's token-id inputs stay as they are.

    Returns
    -------
    Manifest of the written file.

    Raises
    ------
    ValueError
        Names of the wrong count; an encoding for a tensor the graph does not have; an encoding
        whose decoded values differ from the module's tensor; a ``text`` whose feeds are not exactly
        the graph's inputs, which are not all int64, or whose name is an input name.
    """
    import torch

    from pyserve.artifact import _graph

    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise ValueError("save: example_inputs must be a non-empty tuple of torch.Tensor")
    if dynamic_axes is None:
        dynamic_axes = tuple((0,) if t.dim() > 0 else () for t in example_inputs)
    dynamic_axes = tuple(tuple(int(d) for d in axes) for axes in dynamic_axes)
    if len(dynamic_axes) != len(example_inputs) or any(
            not 0 <= d < t.dim() for axes, t in zip(dynamic_axes, example_inputs) for d in axes):
        raise ValueError(f"save: dynamic_axes {dynamic_axes} does not fit {len(example_inputs)} inputs of ranks "
                         f"{[t.dim() for t in example_inputs]}")
    ep = _graph.export(module, example_inputs, dynamic_axes=dynamic_axes)
    with torch.no_grad():
        outputs = _graph.eval_mode(module)(*example_inputs)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    input_names = list(input_names or [f"input__{i}" for i in range(len(example_inputs))])
    output_names = list(output_names or [f"output__{i}" for i in range(len(outputs))])
    if len(input_names) != len(example_inputs):
        raise ValueError(f"save: input_names has {len(input_names)} names for {len(example_inputs)} inputs")
    if len(output_names) != len(outputs):
        raise ValueError(f"save: output_names has {len(output_names)} names for {len(outputs)} outputs")

    def spec(name, t, axes=(0,)):
        return TensorSpec(name, dtypes.from_torch(t.dtype).name,
                          tuple(-1 if i in axes else int(n) for i, n in enumerate(t.shape)))

    # An output's dynamic dims are those the exported graph keeps symbolic (dim 0 at least).
    out_node = [n for n in ep.graph.nodes if n.op == "output"][0]
    out_vals = [getattr(o, "meta", {}).get("val") for o in out_node.args[0]]
    out_axes = [tuple({0} | {i for i, d in enumerate(v.shape) if not isinstance(d, int)})
                if isinstance(v, torch.Tensor) else (0,) for v in out_vals]
    if len(out_axes) != len(outputs):
        out_axes = [(0,)] * len(outputs)

    if text is not None:
        if not isinstance(text, TextInput):
            raise ValueError(f"save: argument 'text' must be a pyserve.artifact.TextInput, got {type(text).__name__}")
        if set(text.feeds) != set(input_names):
            raise ValueError(f"save: argument 'text': feeds {sorted(text.feeds)} must name exactly the graph inputs "
                             f"{input_names}")
        if any(t.dtype != torch.int64 for t in example_inputs):
            raise ValueError("save: argument 'text': every graph input must be int64 token ids, got "
                             f"{[str(t.dtype) for t in example_inputs]}")
        if text.name in input_names:
            raise ValueError(f"save: argument 'text': the text input's name {text.name!r} is a graph input name")

    graph_blob, graph_meta, params, constant_names = _graph.serialize(ep)
    encodings = dict(encodings or {})
    unknown = set(encodings) - set(ep.state_dict)
    if unknown:
        raise ValueError(f"save: encodings given for tensors the graph does not have: {sorted(unknown)}")
    blobs: dict[str, bytes] = {"graph": graph_blob}
    tensors: dict[str, dict] = {}
    named = [(k, "parameter" if k in params else "buffer", v) for k, v in ep.state_dict.items()]
    named += [(k, "constant", v) for k, v in ep.constants.items()]
    for name, role, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"save: constant {name!r} is a {type(tensor).__name__}, not a tensor; cannot store it")
        array = tensor.detach().cpu().contiguous().numpy()
        enc = encodings.get(name) or encode_raw(array)
        check = decode_tensor(enc.meta, enc.blobs, name)
        if check.shape != array.shape or not np.array_equal(check, array):
            raise ValueError(f"save: the encoding given for {name!r} does not reproduce the module's tensor")
        entry = dict(enc.meta, role=role, blobs={}, size_bytes=enc.size_bytes)
        for key, data in enc.blobs.items():
            # Blob names are the writer's choice (readers follow the tensor's "blobs" map); short
            # numbers keep the manifest small, which matters for models of a few kilobytes.
            blob_name = str(len(blobs))
            blobs[blob_name] = data
            entry["blobs"][key] = blob_name
        tensors[name] = entry
    manifest = {
        "format": "pyserve-artifact",
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "created_by": f"pyserve {__version__}",
        "inputs": [spec(n, t, axes).to_json() for n, t, axes in zip(input_names, example_inputs, dynamic_axes)],
        "outputs": [spec(n, t, axes).to_json() for n, t, axes in zip(output_names, outputs, out_axes)],
        "graph": dict(graph_meta, blob="graph"),
        "tensors": tensors,
        "stats": stats or {},
    }
    if text is not None:
        blobs["tokenizer"] = text.blob()
        manifest["text"] = text.to_manifest("tokenizer")
    write_container(path, manifest, blobs)
    return read_manifest(path)


def load_artifact(path: str | os.PathLike) -> LoadedArtifact:
    """Read, verify and decode an artifact; returns its manifest and a runnable module.

    The module is called with one ``torch.Tensor`` per ``manifest.inputs`` entry (in order) and
    returns a Tensor, or a tuple in ``manifest.outputs`` order.

    Raises
    ------
    ArtifactError
        Missing, truncated or corrupt file (checksum named), unknown format version, a tensor whose
        stored form is inconsistent, or a graph torch cannot rebuild.
    """
    import torch

    from pyserve.artifact import _graph

    raw, blobs = read_container(path)
    manifest = _manifest_from(raw, path, os.path.getsize(path))
    graph = raw.get("graph") or {}
    if graph.get("format") != _graph.GRAPH_FORMAT or graph.get("blob") not in blobs:
        raise ArtifactError(f"{path}: unsupported graph format {graph.get('format')!r}")
    state, constants, params, int8 = {}, {}, set(), {}
    for name, meta in manifest.tensors.items():
        try:
            own = {key: blobs[blob_name] for key, blob_name in meta["blobs"].items()}
        except (KeyError, TypeError, AttributeError):
            raise ArtifactError(f"{path}: tensor {name!r} names a blob that is not in the file") from None
        array = decode_tensor(meta, own, f"{path}: tensor {name!r}")
        if meta.get("encoding") == "int8":
            int8[name] = int8_parts(meta, own, f"{path}: tensor {name!r}")
        tensor = torch.from_numpy(np.array(array, copy=True))
        role = meta.get("role")
        if role == "constant":
            constants[name] = tensor
        else:
            state[name] = tensor
            if role == "parameter":
                params.add(name)
    try:
        ep = _graph.deserialize(blobs[graph["blob"]], state, constants, params)
        module = ep.module()
    except Exception as exc:  # torch raises many types for a graph it cannot rebuild
        raise ArtifactError(f"{path}: cannot rebuild the model graph: {type(exc).__name__}: {exc}") from None
    problem = _graph.check_signature(ep, manifest, state, constants)
    if problem:
        raise ArtifactError(f"{path}: manifest does not match the model graph: {problem}")
    for p in module.parameters():
        p.requires_grad_(False)
    text = None
    if "text" in raw:
        try:
            text = TextInput.from_manifest(raw["text"], blobs, str(path))
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
        missing = sorted({s.name for s in manifest.inputs} ^ set(text.feeds))
        if missing:
            raise ArtifactError(f"{path}: text section feeds {sorted(text.feeds)}, the graph's inputs are "
                                f"{[s.name for s in manifest.inputs]}")
    return LoadedArtifact(manifest, module, int8, text)


def load_module(path: str | os.PathLike):
    """The runnable ``torch.nn.Module`` of the artifact at ``path``: :func:`load_artifact` (``path``).module,
    or, when the artifact holds a tokenizer, :meth:`LoadedArtifact.text_module` (which takes
    sentences as well as the graph's token ids)."""
    art = load_artifact(path)
    return art.text_module() if art.text is not None else art.module
