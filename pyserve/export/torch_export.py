"""torch export: a torch.export program (``.pt2``), or TorchScript (``.pt``) where torch.export cannot
capture the model. Both embed the protocol signature (extra file ``pyserve_signature.json``) and are
loaded by the ``torch`` backend (``model.pt2``: backend ``torch``; ``model.pt``: platform
``pytorch_libtorch``).
"""

from __future__ import annotations

from pathlib import Path

from pyserve.backends._common import SIGNATURE_KEY, signature_to_json
from pyserve.backends.base import ModelSignature

__all__ = ["save_pt2", "save_torchscript"]


def _eval(module):
    """``module`` in eval mode; the module of a torch.export program refuses ``eval()`` and needs none."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


def save_pt2(module, example_inputs: tuple, sig: ModelSignature, path: Path, *, dynamic_batch: bool = True) -> None:
    """``torch.export.export`` ``module`` (dim 0 of batched inputs dynamic) and ``torch.export.save`` it.

    Raises whatever torch.export raises when it cannot capture the model (the caller falls back to
    TorchScript).
    """
    import torch

    dyn = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        dyn = tuple({0: batch} if s.shape and s.shape[0] == -1 else None for s in sig.inputs)
    ep = torch.export.export(_eval(module), tuple(example_inputs), dynamic_shapes=dyn)
    for node in ep.graph.nodes:  # keep the writer's source paths out of the file
        node.meta.pop("stack_trace", None)
    torch.export.save(ep, str(path), extra_files={SIGNATURE_KEY: signature_to_json(sig)})


def save_torchscript(module, example_inputs: tuple, sig: ModelSignature, path: Path) -> None:
    """``torch.jit.trace`` ``module`` on ``example_inputs`` and save it with the signature embedded.

    Tracing records the operations run for the example; data-dependent control flow is frozen (the
    caller compares the result with the source on other inputs).
    """
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(_eval(module), tuple(example_inputs), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={SIGNATURE_KEY: signature_to_json(sig)})
