"""Training and evaluation loops the compression stages share (classification tasks)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


@dataclass
class Task:
    """A supervised classification task: float32 inputs, int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 1e-3
    seed: int = 0
    verbose: bool = True

    @classmethod
    def from_dataset(cls, name: str, **kwargs) -> "Task":
        from pyserve import datasets

        data = datasets.load(name)
        return cls(torch.from_numpy(data.train.images), torch.from_numpy(data.train.labels),
                   torch.from_numpy(data.test.images), torch.from_numpy(data.test.labels), **kwargs)

    #: what :meth:`evaluate` measures, for reports
    metric = "test accuracy"
    #: dims of each model input that vary between requests (the batch, dim 0)
    dynamic_axes = None

    def example_inputs(self, n: int = 2) -> tuple[torch.Tensor]:
        return (self.test_x[:n].clone(),)

    def evaluate(self, model: nn.Module) -> float:
        """Top-1 test accuracy (fraction)."""
        return accuracy(model, self.test_x, self.test_y, self.eval_batch_size)

    def set_reference(self, model: nn.Module) -> None:
        """Record the fp32 model's outputs (nothing to record for classification)."""

    def details(self, model: nn.Module) -> dict:
        """Extra quality figures for the report (none for classification)."""
        return {}

    def check_outputs(self, outs: tuple, declared: int, dataset: str) -> str | None:
        """A problem with the model's outputs for this task, or None."""
        n_classes = int(self.train_y.max()) + 1
        if outs[0].dim() != 2 or outs[0].shape[1] < n_classes:
            return (f"the model returns shape [-1, {', '.join(map(str, outs[0].shape[1:]))}]; "
                    f"classifying {dataset} needs [-1, {n_classes}] logits")
        return None

    def calibration_batches(self, n: int, batch_size: int = 64):
        """Model inputs (tuples) from the first ``n`` training examples, in batches."""
        x = self.train_x[:n]
        return [(x[i:i + batch_size],) for i in range(0, len(x), batch_size)]

    def train_batches(self, epoch: int):
        """(inputs tuple, labels or None) for one epoch of training, shuffled by seed and epoch."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.train_x), generator=gen)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield (self.train_x[idx],), self.train_y[idx]

    def log(self, msg: str) -> None:
        if self.verbose:
            tqdm.write(msg, file=sys.stderr)  # above any progress bar


def progress(iterable=None, *, total: int | None = None, desc: str, verbose: bool, leave: bool = True,
             position: int | None = None) -> tqdm:
    """A tqdm progress bar on stderr, shown only when ``verbose`` and stderr is a terminal."""
    return tqdm(iterable, total=total, desc=desc, leave=leave, position=position, file=sys.stderr,
                disable=not verbose or not sys.stderr.isatty(), dynamic_ncols=True)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``x`` [N, ...] against labels ``y`` [N]."""
    _eval_mode(model)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def _train_mode(model: nn.Module) -> None:
    try:
        model.train()
    except NotImplementedError:  # torch.export graphs train as captured (no mode switch)
        pass


def _eval_mode(model: nn.Module) -> None:
    try:
        model.eval()
    except NotImplementedError:  # modules rebuilt by torch.export are captured in eval mode already
        pass


def fit(model: nn.Module, task: Task, epochs: int, *, lr: float | None = None,
        params=None, after_step: Callable[[], None] | None = None, desc: str = "train") -> None:
    """Train ``model`` with Adam (cosine learning-rate decay to 0) and cross-entropy for ``epochs``
    epochs over the task's train split.

    ``after_step`` runs after every optimizer step (the pruning stage uses it to re-apply masks so
    pruned weights stay exactly zero).
    """
    if epochs <= 0:
        return
    gen = torch.Generator().manual_seed(task.seed)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr or task.lr)
    steps = epochs * ((len(task.train_x) + task.batch_size - 1) // task.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    n = len(task.train_x)
    for epoch in range(epochs):
        _train_mode(model)
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        bar = progress(range(0, n, task.batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                       verbose=task.verbose, leave=False, position=1)
        for i in bar:
            idx = perm[i:i + task.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(task.train_x[idx]), task.train_y[idx])
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(idx)
            if not bar.disable and (i // task.batch_size) % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        bar.close()
        task.log(f"  {desc} epoch {epoch + 1}/{epochs}: loss {total / n:.4f}")
    _eval_mode(model)


# aten ops whose argument 1 is a Linear / convolution weight, in graphs captured by torch.export
_GRAPH_WEIGHT_OPS = ("linear", "conv1d", "conv2d", "conv3d", "convolution")


def weight_key(name: str) -> str:
    """The state_dict key of layer ``name``'s weight: ``"fc1.weight"``, or ``"weight"`` for the model
    itself (a bare ``nn.Linear`` as the whole model: its layer name is ``""``)."""
    return f"{name}.weight" if name else "weight"


def weight_layers(model: nn.Module, names=None) -> dict[str, nn.Module]:
    """Linear and convolution layers by name (all of them, or those in ``names``): each value is a
    module whose ``weight`` parameter is the layer's weight, Linear ``[out, in]`` or Conv
    ``[out, in/groups, *kernel]``.

    A model rebuilt from torch.export (``ExportedProgram.module()``, a GraphModule) has no
    ``nn.Linear``/``nn.Conv*`` modules left: its layers are the submodules holding a ``weight``
    parameter that an ``aten.linear`` / ``aten.conv*`` / ``aten.convolution`` node takes as its
    weight (names as in the original model: ``fc1`` for ``fc1.weight``).

    Raises ValueError naming any requested layer that is not a Linear/Conv layer of ``model``.
    """
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    if isinstance(model, torch.fx.GraphModule):
        layers.update(_graph_weight_layers(model))
    if names is None:
        return layers
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"layer {missing[0]!r} is not a Linear/Conv layer of the model; layers: {', '.join(layers)}")
    return {n: layers[n] for n in names}


def _graph_weight_layers(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        op = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", "")
        if op not in _GRAPH_WEIGHT_OPS:
            continue
        w = node.args[1]
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
            continue
        owner, _, attr = w.target.rpartition(".")
        if attr != "weight" or not owner:
            continue  # only parameters named <layer>.weight: the stages address them that way
        try:
            module = gm.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(module._parameters.get("weight"), nn.Parameter) or hasattr(module, "parametrizations"):
            out[owner] = module
    return out


def is_linear_weight(module: nn.Module) -> bool:
    """True for a Linear layer (2-D weight), False for a convolution (3-D or more)."""
    return module.weight.dim() == 2


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
