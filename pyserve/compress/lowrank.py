"""Low-rank factorization of Linear layers by truncated SVD (method ``lowrank``).

``W [out, in] = U S V^T``; keeping the ``r`` largest singular values gives the best rank-``r``
approximation in Frobenius and spectral norm (Eckart-Young 1936). The layer becomes two Linear
layers, ``in -> r`` with weight ``sqrt(S_r) V_r^T`` (no bias) and ``r -> out`` with weight
``U_r sqrt(S_r)`` and the original bias, which costs ``r (in + out)`` instead of ``in * out``
multiply-adds and parameters (Denton et al. 2014, "Exploiting Linear Structure Within
Convolutional Networks for Efficient Evaluation", section 3.2; Xue et al. 2013 for speech DNNs).

The rank is ``rank`` (the same for every selected layer) or the smallest that keeps an ``energy``
fraction of ``sum(S**2)``; a layer is factorized only when that saves parameters
(``r (in + out) < in * out``). ``finetune_epochs`` then trains the factorized model against the
unfactorized one as a frozen teacher with the distillation loss of :mod:`pyserve.compress.distill`
(its ``temperature`` and weights).

Convolutions (``conv: depthwise-separable``): each selected ``nn.Conv2d`` (``groups == 1``) of weight
``W [Cout, Cin, kh, kw]`` becomes a depthwise convolution (``Cin`` filters ``kh x kw``, one per input
channel, same stride, padding and dilation) followed by a pointwise ``1 x 1`` convolution
``Cin -> Cout`` with the original bias — the depthwise separable convolution of MobileNets (Howard et
al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
section 3.1), costing ``Cin (kh kw + Cout)`` parameters instead of ``Cout Cin kh kw``. Its weight is
``W'[o, c] = P[o, c] D[c]``: rank 1 in each input channel's ``[Cout, kh kw]`` slice, so the best
initialisation (Frobenius) is that slice's leading singular pair, ``D[c] = sqrt(s1) v1``,
``P[:, c] = sqrt(s1) u1`` (Eckart-Young per channel; the per-channel rank-1 case of Jaderberg et al.
2014, "Speeding up Convolutional Neural Networks with Low Rank Expansions"). Accuracy lost by the
replacement is recovered by ``finetune_epochs`` of distillation from the original model. A convolution
is replaced only when that saves parameters. ``rank`` / ``energy`` may then be omitted (no Linear
factorized); ``include`` / ``exclude`` select convolutions and Linear layers by module name alike.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pyserve.compress.distill import DistillConfig, distill_train, find_layer_stack
from pyserve.compress.methods import CompressionState, register, select_by_name

__all__ = ["CONV_MODES", "LowRankConfig", "depthwise_separable", "factorize", "rank_for_energy"]

#: Values of ``conv``: leave convolutions alone (None) or replace them by depthwise + pointwise ones.
CONV_MODES = ("depthwise-separable",)


@dataclass(frozen=True)
class LowRankConfig:
    """Exactly one of ``rank`` (>= 1) or ``energy`` (in (0, 1]) for Linear layers — or neither when
    ``conv`` is given (then only convolutions change); ``conv``: ``None`` or ``"depthwise-separable"``
    (Conv2d layers, module docstring); ``include`` / ``exclude`` fnmatch patterns on module names;
    ``finetune_epochs`` >= 0 with ``lr`` > 0; ``temperature`` and ``weight_*`` as in ``distill``."""

    rank: int | None = None
    energy: float | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    finetune_epochs: int = 0
    lr: float = 1e-4
    temperature: float = 2.0
    weight_kl: float = 5.0
    weight_task: float = 2.0
    weight_cosine: float = 1.0
    conv: str | None = None

    def __post_init__(self):
        if self.conv is not None and self.conv not in CONV_MODES:
            raise ValueError(f"conv: expected one of {CONV_MODES} (or omit it), got {self.conv!r}")
        if self.rank is not None and self.energy is not None:
            raise ValueError("rank, energy: give exactly one of them")
        if self.rank is None and self.energy is None and self.conv is None:
            raise ValueError("rank, energy: give exactly one of them (or conv: depthwise-separable)")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy: must be in (0, 1], got {self.energy}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs: must be >= 0, got {self.finetune_epochs}")
        DistillConfig(temperature=self.temperature, weight_kl=self.weight_kl, weight_task=self.weight_task,
                      weight_cosine=self.weight_cosine, lr=self.lr)

    def check(self, model: nn.Module, task) -> None:
        """Raise ValueError, before any work: no Linear selected, ``rank`` above min(in, out); with
        ``conv``: no Conv2d selected, a selected convolution that is grouped already."""
        if self.rank is not None or self.energy is not None:
            _selected(model, self)
        if self.conv is not None:
            _selected_convs(model, self)


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum(s[:r]**2) >= energy * sum(s**2)`` (``s`` descending)."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def factorize(linear: nn.Linear, rank: int) -> nn.Sequential:
    """``nn.Sequential(Linear(in, rank, bias=False), Linear(rank, out))`` whose product is the
    best rank-``rank`` approximation of ``linear``'s weight; raises ValueError for a rank outside
    ``1..min(in, out)``."""
    out_f, in_f = linear.weight.shape
    if not 1 <= rank <= min(in_f, out_f):
        raise ValueError(f"rank: {rank} is outside 1..min(in, out) = 1..{min(in_f, out_f)}")
    w = linear.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(in_f, rank, bias=False)
    second = nn.Linear(rank, out_f, bias=linear.bias is not None)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).float())
        second.weight.copy_((u[:, :rank] * root[None, :]).float())
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return nn.Sequential(first, second)


def depthwise_separable(conv: nn.Conv2d) -> nn.Sequential:
    """``nn.Sequential(depthwise Conv2d(Cin, Cin, k, groups=Cin, bias=False), Conv2d(Cin, Cout, 1))``
    initialised from ``conv`` by a rank-1 SVD of each input channel's ``[Cout, kh*kw]`` weight slice
    (module docstring); stride, padding, dilation and padding mode stay on the depthwise part, the
    bias on the pointwise part. Raises ValueError for a grouped convolution (``groups != 1``)."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"conv: depthwise-separable replaces nn.Conv2d layers, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"conv: the convolution has groups={conv.groups}; only groups=1 is replaced")
    cout, cin, kh, kw = conv.weight.shape
    w = conv.weight.detach().double().permute(1, 0, 2, 3).reshape(cin, cout, kh * kw)  # per input channel
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # [cin, cout, r], [cin, r], [cin, r, kh*kw]
    root = s[:, 0].sqrt()
    depth = nn.Conv2d(cin, cin, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      groups=cin, bias=False, padding_mode=conv.padding_mode)
    point = nn.Conv2d(cin, cout, 1, bias=conv.bias is not None)
    with torch.no_grad():
        depth.weight.copy_((root[:, None] * vh[:, 0, :]).reshape(cin, 1, kh, kw).float())
        point.weight.copy_((u[:, :, 0] * root[:, None]).T.reshape(cout, cin, 1, 1).float())
        if conv.bias is not None:
            point.bias.copy_(conv.bias.detach())
    return nn.Sequential(depth, point).to(conv.weight.device)


def _selected_convs(model: nn.Module, cfg: LowRankConfig) -> dict[str, nn.Conv2d]:
    convs = select_by_name({n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)},
                           cfg.include, cfg.exclude)
    if not convs:
        raise ValueError("conv, include/exclude: no Conv2d layer of the model is selected")
    if "" in convs:
        raise ValueError("conv: the model is a single nn.Conv2d: depthwise-separable replaces a layer by two "
                         "inside a model; wrap it (torch.nn.Sequential(layer))")
    for n, m in convs.items():
        if m.groups != 1:
            raise ValueError(f"conv: layer {n!r} has groups={m.groups}; depthwise-separable replaces only "
                             f"groups=1 convolutions (exclude it)")
    return convs


def _selected(model: nn.Module, cfg: LowRankConfig) -> dict[str, nn.Linear]:
    linears = select_by_name({n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)},
                             cfg.include, cfg.exclude)
    if not linears:
        raise ValueError("include/exclude: no Linear layer of the model is selected")
    if "" in linears:
        raise ValueError("the model is a single nn.Linear: lowrank replaces a layer by two inside a model; wrap "
                         "it (torch.nn.Sequential(layer)) or use another method")
    if cfg.rank is not None:
        for n, m in linears.items():
            if cfg.rank > min(m.weight.shape):
                raise ValueError(f"rank: {cfg.rank} is above min(in, out) = {min(m.weight.shape)} of layer {n!r} "
                                 f"{list(m.weight.shape[::-1])}")
    return linears


def _set(model: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    mod = model.get_submodule(parent) if parent else model
    setattr(mod, attr, value)


@register("lowrank", LowRankConfig)
def lowrank(state: CompressionState, cfg: LowRankConfig, task) -> dict:
    """Factorize the selected Linear layers (module docstring) in a copy of ``state.model``.

    Raises ValueError before any change: no Linear layer selected, ``rank`` above
    ``min(in, out)`` of a selected layer, an earlier weight-storing stage (prune, quantize, int8)."""
    if state.masks or state.codebooks or state.int8:
        raise ValueError("lowrank: must run before prune, quantize and int8 (it changes the layers)")
    teacher = state.model
    linears = _selected(teacher, cfg) if cfg.rank is not None or cfg.energy is not None else {}
    convs = _selected_convs(teacher, cfg) if cfg.conv is not None else {}
    student = copy.deepcopy(teacher)
    report = {}
    for n, m in convs.items():
        cout, cin, kh, kw = m.weight.shape
        dense, separable = cout * cin * kh * kw, cin * (kh * kw + cout)
        saves = separable < dense
        report[n] = {"shape": [cout, cin, kh, kw], "conv": cfg.conv, "factorized": saves,
                     "parameters": separable if saves else dense, "dense_parameters": dense}
        if saves:
            _set(student, n, depthwise_separable(student.get_submodule(n)))
    for n, m in linears.items():
        out_f, in_f = m.weight.shape
        if cfg.rank is not None:
            r = cfg.rank
        else:
            r = rank_for_energy(torch.linalg.svdvals(m.weight.detach().double()), cfg.energy)
        saves = r * (in_f + out_f) < in_f * out_f
        report[n] = {"shape": [out_f, in_f], "rank": r, "factorized": saves,
                     "parameters": r * (in_f + out_f) if saves else in_f * out_f, "dense_parameters": in_f * out_f}
        if saves:
            _set(student, n, factorize(student.get_submodule(n), r))
    for p in student.parameters():
        p.requires_grad_(True)
    if cfg.finetune_epochs > 0:
        dcfg = DistillConfig(temperature=cfg.temperature, weight_kl=cfg.weight_kl, weight_task=cfg.weight_task,
                             weight_cosine=cfg.weight_cosine, epochs=cfg.finetune_epochs, lr=cfg.lr)
        try:
            _, t_stack = find_layer_stack(teacher)
            _, s_stack = find_layer_stack(student)
        except ValueError:
            t_stack = s_stack = None
        distill_train(student, teacher, task, dcfg, student_stack=s_stack, teacher_stack=t_stack, desc="lowrank fine-tune")
    state.model = student
    return report
