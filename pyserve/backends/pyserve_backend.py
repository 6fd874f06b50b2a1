"""The ``pyserve`` backend: hosts one ``.pyserve`` artifact (see :mod:`pyserve.artifact`).

Loading reads, verifies (checksums) and decodes the artifact in a thread executor, then puts each
Linear layer on the fastest of the native kernels its stored form allows — torch's dense fp32,
``int8_linear`` (int8 weights), ``csr_linear`` (pruned weights), ``codebook_linear`` (pruned and
weight-shared) — measured at load (:func:`pyserve.artifact.kernels.native_module`); the choice per
layer is in :attr:`PyserveBackend.kernel_choices`. A graph made of Linear layers, ReLU and
softmax (LeNet-300-100 and other MLPs) or of a transformer encoder's nodes after ``native_module``
(MiniLM / BERT: embeddings, the native int8 layers and attention, pooling; token ids or sentences
in) then runs as a straight-line NumPy plan (:func:`pyserve.artifact.plan.compile_plan`: no
torch.fx/pytree/dispatch cost per call, BLAS without the GIL), checked at load against the graph
on a sample input (ones for integer inputs); ``graph_executor="graph"`` (or
``PYSERVE_GRAPH_EXECUTOR=graph``) keeps the GraphModule. :attr:`PyserveBackend.graph_executor` says which runs. ``kernels`` (or the ``PYSERVE_KERNELS``
environment variable) forces ``dense`` or one kernel instead of ``auto``. ``attention="bf16"`` (or
``PYSERVE_ATTENTION=bf16``) runs transformer attention with bfloat16 products where the CPU has
AVX-512 BF16 (:func:`pyserve.ops.attention_qkv`, ``precision="bf16"``); ``fp32`` is the default. Inference runs the module
under ``torch.inference_mode()`` in the same executor (or inline on the event loop when the server
measured the execution as tiny, see ``serve --inline-max-us``). torch and the
artifact reader are imported on :meth:`PyserveBackend.load`, not at import.

An artifact that holds a tokenizer (docs/artifact.md, "Text input") is served with its BYTES input
of sentences (e.g. ``text``, shape ``[-1]``, UTF-8): each request's sentences are tokenized with the
stored tokenizer and run through the graph; an element that is not UTF-8 fails its request with
INVALID_ARGUMENT. ``inputs="token_ids"`` (or ``PYSERVE_INPUTS=token_ids``) serves the graph's
token-id inputs instead; ``text`` requires a tokenizer; ``auto`` (default) takes text where there is one.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import threading
from concurrent.futures import Executor
from pathlib import Path
from typing import Sequence

import numpy as np

from pyserve.backends._common import check_output, run_each, run_torch_batch, skip_export_input_checks
from pyserve.backends.base import InferInputs, InferResult, ModelSignature, TensorSpec
from pyserve.protocol.errors import InvalidArgument

__all__ = ["ATTENTION_PRECISIONS", "GRAPH_EXECUTORS", "INPUT_MODES", "PyserveBackend"]

#: The precision of the native attention (:func:`pyserve.ops.attention_qkv`): ``fp32`` (default) or
#: ``bf16`` (bfloat16 products summed in fp32 on CPUs with AVX-512 BF16; fp32 elsewhere).
ATTENTION_PRECISIONS = ("fp32", "bf16")

#: What runs a loaded graph: ``auto`` (the straight-line plan where the graph allows one, else the
#: GraphModule) or ``graph`` (always the GraphModule).
GRAPH_EXECUTORS = ("auto", "graph")

#: What a ``pyserve`` backend serves: ``auto`` (the text input where the artifact has a tokenizer,
#: else token ids), ``text`` (refuse an artifact without one), ``token_ids`` (the graph's inputs).
INPUT_MODES = ("auto", "text", "token_ids")


class PyserveBackend:
    """Backend for ``DIR/<model>/<version>/model.pyserve``."""

    platform = "pyserve"

    def __init__(self, artifact_path: Path, *, executor: Executor | None = None, kernels: str | None = None,
                 inputs: str | None = None, graph_executor: str | None = None, attention: str | None = None) -> None:
        self._path = Path(artifact_path)
        self._executor = executor
        # each setting: the argument, else its environment variable; empty means unset
        from pyserve.artifact.kernels import KERNELS

        self._kernels = kernels or os.environ.get("PYSERVE_KERNELS") or "auto"
        if self._kernels not in KERNELS:
            raise ValueError(f"pyserve backend: argument 'kernels' (or PYSERVE_KERNELS): expected one of {KERNELS}, "
                             f"got {self._kernels!r}")
        self._inputs = inputs or os.environ.get("PYSERVE_INPUTS") or "auto"
        if self._inputs not in INPUT_MODES:
            raise ValueError(f"pyserve backend: argument 'inputs' (or PYSERVE_INPUTS): expected one of {INPUT_MODES}, "
                             f"got {self._inputs!r}")
        self._attention = attention or os.environ.get("PYSERVE_ATTENTION") or "fp32"
        if self._attention not in ATTENTION_PRECISIONS:
            raise ValueError(f"pyserve backend: argument 'attention' (or PYSERVE_ATTENTION): expected one of "
                             f"{ATTENTION_PRECISIONS}, got {self._attention!r}")
        self._graph_mode = graph_executor or os.environ.get("PYSERVE_GRAPH_EXECUTOR") or "auto"
        if self._graph_mode not in GRAPH_EXECUTORS:
            raise ValueError(f"pyserve backend: argument 'graph_executor' (or PYSERVE_GRAPH_EXECUTOR): expected one "
                             f"of {GRAPH_EXECUTORS}, got {self._graph_mode!r}")
        self._module = None
        self._plan = None
        self._check = None  # (names, torch.export's shape check, {input position: vocabulary}), set by load()
        self._signature: ModelSignature | None = None
        #: weight tensor name -> kernel ("dense", "int8", "csr", "codebook"), set by load()
        self.kernel_choices: dict[str, str] = {}
        #: what runs the graph, set by load(): "plan" (straight-line NumPy plan) or "graph" (the GraphModule)
        self.graph_executor: str | None = None
        #: the native attention's precision as it runs, set by load() for graphs that have one: "fp32",
        #: "bf16", or "fp32 (bf16 asked; ...)" on a CPU without AVX-512 BF16; None without attention
        self.attention: str | None = None

    @property
    def ready(self) -> bool:
        return self._module is not None

    @property
    def signature(self) -> ModelSignature:
        if self._signature is None:
            raise RuntimeError(f"backend for {self._path} is not loaded")
        return self._signature

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        module, signature, choices, attention = await loop.run_in_executor(
            self._executor, functools.partial(_load, self._path, self._kernels, self._inputs, self._attention))
        self.attention = attention
        plan = None
        if self._graph_mode == "auto":
            if getattr(module, "text", None) is None:
                plan = await loop.run_in_executor(self._executor, _plan_for, module, signature)
            else:  # sentences in: the plan runs the graph behind the tokenizer
                plan = await loop.run_in_executor(self._executor, _plan_for, module.graph, _token_signature(module,
                                                                                                              signature))
        self._module, self._plan, self._signature, self.kernel_choices = module, plan, signature, choices
        self.graph_executor = "graph" if plan is None else "plan"
        self._check = None if getattr(module, "text", None) is not None else _request_check(module, signature)

    async def infer(self, batch: Sequence[InferInputs]) -> list[InferResult]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.infer_sync, list(batch))

    def infer_sync(self, batch: Sequence[InferInputs]) -> list[InferResult]:
        """:meth:`infer` on the calling thread (the server runs measured-tiny executions inline)."""
        module, signature = self._module, self._signature
        if module is None or signature is None:
            raise RuntimeError(f"backend for {self._path} is not loaded")
        plan = self._plan
        if getattr(module, "text", None) is not None:
            return _run_text_batch(module, signature, list(batch), plan)
        check = self._check
        if check is None:
            return run_plan_batch(plan, signature, batch) if plan is not None else run_torch_batch(module, signature,
                                                                                                  batch)
        return _run_prepared([_checked(check, inputs) for inputs in batch], module, plan, signature)

    async def unload(self) -> None:
        self._module = None
        self._plan = None


#: torch.export's deserializer keeps process-global state (``_CURRENT_DESERIALIZER``), so two
#: artifacts rebuilt at once in the thread pool fail with "AssertionError: _CURRENT_DESERIALIZER is
#: already set"; loads are serialized (inference is not).
_LOAD_LOCK = threading.Lock()


def _load(path: Path, kernels: str = "auto", inputs: str = "auto", attention: str = "fp32"):
    from pyserve.artifact import load_artifact
    from pyserve.artifact.kernels import _attention_qkv, native_module

    with _LOAD_LOCK:
        art = load_artifact(path)
    if inputs == "text" and art.text is None:
        raise ValueError(f"{path}: PYSERVE_INPUTS=text, but the artifact holds no tokenizer (it takes "
                         f"{', '.join(s.name for s in art.manifest.inputs)})")
    module, choices = native_module(art, kernels=kernels, attention=attention)
    heads = [n.args[3] for n in module.graph.nodes if n.op == "call_function" and n.target is _attention_qkv]
    running = None
    if heads:
        from pyserve.ops import attention_qkv_bf16

        running = attention
        if attention == "bf16" and not all(attention_qkv_bf16(d) for d in heads):
            running = ("fp32 (bf16 asked; not available here: no AVX-512 BF16 on this CPU, PYSERVE_DISABLE_AVX512 "
                       "set, or a head size without the kernel)")
    skip_export_input_checks(module)  # the data plane checked names, datatypes and shapes already
    m = art.manifest

    def specs(items) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(s.name, s.datatype, tuple(int(d) for d in s.shape)) for s in items)

    if art.text is not None and inputs != "token_ids":
        module = art.text_module()  # wraps art.module, already on the native kernels
        return module, ModelSignature(inputs=specs([m.text_input]), outputs=specs(m.outputs)), choices, running
    return module, ModelSignature(inputs=specs(m.inputs), outputs=specs(m.outputs)), choices, running


def _plan_for(module, signature: ModelSignature):
    """The module's straight-line plan (checked on a 2-row sample of each input), or None."""
    from pyserve import dtypes
    from pyserve.artifact.plan import compile_plan

    gen = np.random.default_rng(0)
    sample = []
    for spec in signature.inputs:
        dtype = dtypes.from_name(spec.datatype).numpy
        if dtype is None or dtype.kind not in "fiub" or spec.datatype == "BF16":
            return None
        shape = tuple(2 if d < 0 else d for d in spec.shape)
        # float inputs: random values; integer ones (token ids, masks): ones, valid for both
        sample.append(gen.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype))
    try:
        return compile_plan(module, tuple(sample))
    except Exception:  # noqa: BLE001 - a graph the plan cannot run is served by the GraphModule
        return None


def run_plan_batch(plan, signature: ModelSignature, batch: Sequence[InferInputs]) -> list[InferResult]:
    """:func:`run_torch_batch` for a straight-line plan: each request's inputs (in signature order)
    through ``plan``; a failure or an output of another datatype is that request's result only."""
    in_names = [s.name for s in signature.inputs]
    outs = signature.outputs

    def one(inputs: InferInputs):
        results = plan(*[inputs[n] for n in in_names])
        if len(results) != len(outs):
            raise RuntimeError(f"the model returned {len(results)} output(s); its signature declares {len(outs)}")
        return {spec.name: check_output(r, spec) for spec, r in zip(outs, results)}

    return run_each(one, batch)


def _request_check(module, signature: ModelSignature):
    """What :func:`_checked` needs for ``module``'s graph, or None when there is nothing to check:
    torch.export's shape constraints (:func:`pyserve.artifact.kernels.input_checker`) and the
    vocabulary of the inputs that are token ids (:func:`pyserve.artifact.kernels.embedding_vocab`).
    A graph of one input and no embedding (an MLP, a CNN) is left to the data plane's signature
    check: no two inputs to agree, and ~7 us a request saved (LeNet-300-100's whole call is ~30)."""
    from pyserve.artifact.kernels import embedding_vocab, input_checker

    try:
        vocab = embedding_vocab(module)
        if len(signature.inputs) < 2 and not vocab:
            return None
        shapes = input_checker(module)
    except Exception:  # noqa: BLE001 - a module of another kind: no checks beyond the data plane's
        return None
    if shapes is None and not vocab:
        return None
    return tuple(s.name for s in signature.inputs), shapes, vocab


def _checked(check, inputs: InferInputs):
    """``inputs``, or the InvalidArgument naming what breaks the model's shape constraints (two
    inputs' dims that must agree, a dim's range), an empty sequence of token ids, or which token id
    lies outside the vocabulary: the
    data plane checked each input against the signature alone, and the model would broadcast such
    shapes silently or fail with an internal error."""
    names, shapes, vocab = check
    arrays = [inputs[n] for n in names]
    if shapes is not None:
        try:
            shapes(*arrays)
        except Exception as exc:  # noqa: BLE001 - torch's message, with the inputs named
            msg = re.sub(r"\*args\[(\d+)\]", lambda m: repr(names[int(m.group(1))]) if int(m.group(1)) < len(names)
                         else m.group(0), str(exc))
            return InvalidArgument(f"inputs do not fit the model's shapes: {msg}")
    for i, rows in vocab.items():
        ids = arrays[i]
        if ids.ndim >= 2 and ids.shape[-1] == 0 and ids.shape[0] > 0:  # the model would pool nothing into zeros
            return InvalidArgument(f"input {names[i]!r} has no tokens (shape {list(ids.shape)}): each sequence needs "
                                   "at least one")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= rows):
            bad = np.argwhere((ids < 0) | (ids >= rows))[0]
            return InvalidArgument(f"input {names[i]!r}: token id {int(ids[tuple(bad)])} at {tuple(int(x) for x in bad)} "
                                   f"is outside the vocabulary [0, {rows})")
    return inputs


def _token_signature(module, signature: ModelSignature) -> ModelSignature:
    """The signature of a text module's graph: its token-id inputs (INT64 ``[B, S]`` each)."""
    return ModelSignature(inputs=tuple(TensorSpec(n, "INT64", (-1, -1)) for n in module.input_names),
                          outputs=signature.outputs)


def _run_text_batch(module, signature: ModelSignature, batch, plan=None) -> list:
    """Each request's sentences (1-D BYTES) tokenized and run on ``module.graph`` (or its straight-line
    ``plan``); a sentence that is not UTF-8 fails its own request with INVALID_ARGUMENT."""
    name = signature.inputs[0].name
    feeds: list = []
    for inputs in batch:
        try:
            feeds.append({n: t.numpy() for n, t in zip(module.input_names, module.token_inputs(inputs[name]))})
        except ValueError as exc:
            feeds.append(InvalidArgument(f"input {name!r}: {exc}"))
    return _run_prepared(feeds, module.graph, plan, _token_signature(module, signature))


def _run_prepared(prepared: list, module, plan, signature: ModelSignature) -> list:
    """Run the requests of ``prepared`` that are inputs (on ``plan``, else ``module``) and give each
    entry its result in order: an entry that is already an exception (a request refused while it was
    prepared) is its own result."""
    runnable = [p for p in prepared if not isinstance(p, BaseException)]
    results = iter(run_plan_batch(plan, signature, runnable) if plan is not None
                   else run_torch_batch(module, signature, runnable))
    return [p if isinstance(p, BaseException) else next(results) for p in prepared]
