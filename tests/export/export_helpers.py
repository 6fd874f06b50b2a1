"""Helpers shared by the export tests (imported by name: tests/ has no __init__.py)."""

from __future__ import annotations

import numpy as np


def quantize_linears(module, names):
    """{name: (q, scale)} for each Linear ``name``, and a copy of ``module`` holding q * scale."""
    import copy

    import torch

    from pyserve.ops import quantize_per_channel

    qmod = copy.deepcopy(module)
    out = {}
    for name in names:
        lin = qmod.get_submodule(name)
        q, s = quantize_per_channel(lin.weight.detach().numpy().astype(np.float32))
        out[name] = (q, s)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(q.astype(np.float32) * s[:, None]))
    return out, qmod.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def ort_run(path, feeds: dict, outputs=None) -> list:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)
