"""A recipe's own data (``data: {loader: FILE.py:callable}``) read into a classification :class:`Task`.

The contract (also in :class:`~pyserve.compress.recipe.DataSpec`): the callable takes no arguments
and returns ``(train, test)``; each split is a map-style ``torch.utils.data.Dataset`` of ``(x, y)``
items, an iterable (e.g. a ``DataLoader``) of ``(x, y)`` batches, or a pair ``(x [N, ...], y [N])``
of tensors or NumPy arrays. Splits are read once into memory; the recipe's ``train.batch_size`` /
``train.eval_batch_size`` decide the batches and ``seed`` the shuffling.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["split_tensors"]


def _as_tensor(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    return torch.as_tensor(np.asarray(v))


def _stack(values, where: str) -> torch.Tensor:
    try:
        return torch.stack([_as_tensor(v) for v in values])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: examples of different shapes or types cannot be stacked: {exc}") from None


def split_tensors(split, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [N, ...], y [N] int64)`` from one split of a loader factory's result.

    Raises ValueError (message starts with ``where``) for anything that does not follow the contract:
    not (x, y) pairs, an empty split, labels that are not 1-D integers, x and y of different lengths.
    """
    if isinstance(split, (tuple, list)) and len(split) == 2 and not isinstance(split[0], (tuple, list)) \
            and hasattr(split[0], "shape") and hasattr(split[1], "shape"):
        x, y = _as_tensor(split[0]), _as_tensor(split[1])
    elif isinstance(split, (list, tuple)) or (
            isinstance(split, torch.utils.data.Dataset) and hasattr(split, "__len__")
            and not isinstance(split, torch.utils.data.IterableDataset)):
        # map-style: one (x, y) example per index
        x, y = _pairs([split[i] for i in range(len(split))], where, batched=False)
    elif hasattr(split, "__iter__"):  # a DataLoader or any iterable of (x [B, ...], y [B]) batches
        x, y = _pairs(list(split), where, batched=True)
    else:
        raise ValueError(f"{where}: expected a Dataset, a DataLoader or an (x, y) pair of tensors, "
                         f"got {type(split).__name__}")
    if x.dim() == 0 or len(x) == 0:
        raise ValueError(f"{where}: the split is empty")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{where}: labels must be integer class indices of shape [N], got {y.dtype} "
                         f"{list(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{where}: {len(x)} examples but {len(y)} labels")
    if int(y.min()) < 0:
        raise ValueError(f"{where}: labels must be class indices >= 0, got {int(y.min())}")
    if x.dtype == torch.float64:
        x = x.float()  # models are float32; a NumPy default array is float64
    return x.contiguous(), y.long().contiguous()


def _pairs(items: list, where: str, *, batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not items:
        raise ValueError(f"{where}: the split is empty")
    for item in items[:1]:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            what = "batch" if batched else "item"
            raise ValueError(f"{where}: each {what} must be an (x, y) pair, got {type(item).__name__}"
                             + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
    if batched:
        try:
            return (torch.cat([_as_tensor(x) for x, _ in items]), torch.cat([_as_tensor(y).reshape(-1) for _, y in items]))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: batches of different shapes or types cannot be joined: {exc}") from None
    return _stack([x for x, _ in items], where), _stack([y for _, y in items], where)
