"""The compression-method registry: a frozen dataclass config per method plus a registered handler.

A handler takes ``(state, config, task)`` and updates the :class:`CompressionState` in place,
returning a short dict for the report. The pipeline looks handlers up by config type, so adding a
method is: write the config and the handler, decorate the handler with :func:`register`
(CONTRIBUTING.md has the checklist). A config may define ``check(model, task)``, raising
ValueError; the pipeline calls it for every stage before any training or evaluation.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable

__all__ = ["CompressionState", "register", "config_class", "handler_for", "select_by_name", "METHODS"]

# method name -> (config class, handler)
METHODS: dict[str, tuple[type, Callable]] = {}


@dataclass
class CompressionState:
    """What the stages build up, in the order they run.

    ``masks``: tensor name -> bool tensor (True = weight kept), set by pruning.
    ``codebooks``: tensor name -> float32 numpy [K] with entry 0 == 0.0, set by quantization
    (the layer's weights then hold only codebook values).
    ``index_bits``: tensor name -> bits of a relative index in the sparse encoding.
    ``entropy``: "huffman" once the Huffman stage ran, else "none".
    ``int8``: tensor name -> (int8 values [N, K], float32 scales [N], static input scale or None),
    set by the ``int8`` method (the layer's weight then holds ``values * scales[:, None]``).
    ``example_inputs``: replaces the task's example inputs when a stage changes the model's
    structure (``distill``, ``lowrank`` set the new model in ``model``).
    """

    model: object
    layers: dict = field(default_factory=dict)          # module name -> module
    masks: dict = field(default_factory=dict)
    codebooks: dict = field(default_factory=dict)
    index_bits: dict = field(default_factory=dict)
    entropy: str = "none"
    int8: dict = field(default_factory=dict)
    reports: list = field(default_factory=list)


def register(name: str, config_cls: type):
    """Decorator: register ``handler`` for method ``name`` with config class ``config_cls``."""

    def wrap(handler: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"compression method {name!r} is already registered")
        config_cls.method = name
        METHODS[name] = (config_cls, handler)
        return handler

    return wrap


def config_class(name: str) -> type:
    """Config class of method ``name``; raises ValueError listing the known methods."""
    try:
        return METHODS[name][0]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None


def handler_for(config) -> Callable:
    for cfg_cls, handler in METHODS.values():
        if type(config) is cfg_cls:
            return handler
    raise ValueError(f"no handler registered for config type {type(config).__name__}")


def select_by_name(named: dict, include: Iterable[str], exclude: Iterable[str]) -> dict:
    """The entries of ``named`` (name -> module) whose name matches an ``include`` pattern and no
    ``exclude`` pattern (fnmatch, case-sensitive), in their order: the layer selection of the
    ``int8`` and ``lowrank`` methods."""
    include, exclude = tuple(include), tuple(exclude)
    return {n: m for n, m in named.items()
            if any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)}

