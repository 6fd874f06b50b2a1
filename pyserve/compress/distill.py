"""Knowledge distillation into a shallower student (method ``distill``).

The student is the teacher with its stack of repeated blocks (the encoder layers of a
transformer: the largest ``nn.ModuleList`` of modules of one type) cut to ``student_layers``
blocks, initialised from the teacher's blocks ``0, 2, 4, ...`` (DistilBERT's initialisation: Sanh et
al. 2019, "DistilBERT, a distilled version of BERT", section 3, "taking one layer out of two"). It is
trained with DistilBERT's triple loss (section 2), the teacher frozen:

* soft targets: ``KL(softmax(z_t / T) || softmax(z_s / T)) * T**2`` (Hinton et al. 2015,
  "Distilling the Knowledge in a Neural Network", section 2: the T² keeps gradient magnitudes
  comparable across temperatures). ``z`` are the model's outputs for a classifier; for a sentence
  embedding model (outputs ``[B, D]`` with no labels) they are the in-batch similarity logits
  ``similarity_scale * e_i . e_t_j`` of each sentence to the teacher's embeddings of the batch;
* the task loss (cross-entropy on the labels) where the task has labels;
* the cosine loss ``1 - cos(h_s, h_t)`` between the student's and the teacher's last hidden states
  (the outputs of the last block), averaged over positions.

``weight_kl``, ``weight_task``, ``weight_cosine`` weight the three terms (DistilBERT: 5, 2, 1).
``weight_output`` (default 0) adds ``1 - cos(z_s, z_t)`` on the model outputs themselves, which for a
sentence-embedding model pulls the student's embeddings onto the teacher's (the output-matching
loss of Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual using
Knowledge Distillation", section 2, with cosine in place of MSE on normalised embeddings).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from pyserve.compress._train import progress
from pyserve.compress.methods import CompressionState, register

__all__ = ["DistillConfig", "find_layer_stack", "make_student", "distill_train"]


@dataclass(frozen=True)
class DistillConfig:
    """``student_layers``: blocks of the student (default: half the teacher's, rounded up, or
    ``len(from_layers)``); ``from_layers``: the teacher blocks the student starts from, increasing
    (default: every other one from block 0, DistilBERT's choice — for all-MiniLM-L6-v2 ``[0, 3, 5]``,
    which keeps the last block, starts far closer to the teacher: README, "BERT on CPUs");
    ``layers``: dotted path of the teacher's block list (default: found automatically);
    ``temperature`` > 0; ``weight_*`` >= 0 (not all 0); ``epochs`` >= 0 over the task's training
    (transfer) data; ``lr`` > 0 (AdamW, linear decay); ``similarity_scale`` for embedding models."""

    student_layers: int | None = None
    from_layers: tuple[int, ...] | None = None
    layers: str | None = None
    temperature: float = 2.0
    weight_kl: float = 5.0
    weight_task: float = 2.0
    weight_cosine: float = 1.0
    weight_output: float = 0.0
    epochs: int = 3
    lr: float = 1e-4
    similarity_scale: float = 20.0

    def __post_init__(self):
        if self.student_layers is not None and self.student_layers < 1:
            raise ValueError(f"student_layers: must be >= 1, got {self.student_layers}")
        if self.from_layers is not None:
            fl = list(self.from_layers)
            if not fl or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in fl) \
                    or any(b <= a for a, b in zip(fl, fl[1:])):
                raise ValueError(f"from_layers: must be increasing block indices >= 0, got {fl}")
            if self.student_layers is not None and self.student_layers != len(fl):
                raise ValueError(f"from_layers: {len(fl)} blocks given for student_layers {self.student_layers}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        for name in ("weight_kl", "weight_task", "weight_cosine", "weight_output"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.weight_kl == self.weight_task == self.weight_cosine == self.weight_output == 0:
            raise ValueError("weight_kl, weight_task, weight_cosine, weight_output: at least one must be > 0")
        if self.epochs < 0:
            raise ValueError(f"epochs: must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")

    def check(self, model: nn.Module, task) -> None:
        """Raise ValueError, before any work: no block list, a student deeper than the teacher."""
        _, stack = find_layer_stack(model, self.layers)
        if self.student_layers is not None:
            student_indices(len(stack), self.student_layers)
        if self.from_layers is not None:
            student_indices(len(stack), len(self.from_layers), self.from_layers)


def find_layer_stack(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's block list: the ``nn.ModuleList`` at ``path``, or the longest ModuleList whose
    members all have one type. Raises ValueError when there is none (or ``path`` is not one)."""
    if path is not None:
        mod = model
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            raise ValueError(f"layers: the model has no module {path!r}") from None
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            raise ValueError(f"layers: {path!r} is not a non-empty nn.ModuleList")
        return path, mod
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"layers: the model ({type(model).__name__}) has no list of repeated blocks to distill")
    return best


def _set_path(model: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    mod = model
    for part in parent.split(".") if parent else []:
        mod = getattr(mod, part)
    setattr(mod, attr, value)


def student_indices(teacher_layers: int, student_layers: int, from_layers=None) -> list[int]:
    """Teacher blocks the student starts from: ``from_layers`` when given (checked against the
    teacher's depth), else every other one (0, 2, 4, ...) when the student has half the blocks
    (rounded up), else evenly spaced from the first block."""
    if student_layers > teacher_layers:
        raise ValueError(f"student_layers: the student ({student_layers} layers) cannot be deeper than the "
                         f"teacher ({teacher_layers} layers)")
    if from_layers is not None:
        bad = [i for i in from_layers if not 0 <= i < teacher_layers]
        if bad:
            raise ValueError(f"from_layers: blocks {bad} are not blocks of the teacher (0..{teacher_layers - 1})")
        return list(from_layers)
    if student_layers == math.ceil(teacher_layers / 2):
        return list(range(0, teacher_layers, 2))
    return [int(round(i * teacher_layers / student_layers)) for i in range(student_layers)]


def make_student(teacher: nn.Module, student_layers: int | None = None, path: str | None = None,
                 from_layers=None) -> tuple[nn.Module, str, list[int]]:
    """(student, block list path, teacher block indices) — a deep copy of ``teacher`` with the
    block list cut to ``student_layers`` blocks copied from the teacher (see :func:`student_indices`;
    ``from_layers`` names them). A ``config.num_hidden_layers`` (Hugging Face models) on the copy is
    updated to match."""
    path, stack = find_layer_stack(teacher, path)
    if from_layers is not None:
        n = len(from_layers)
    else:
        n = student_layers if student_layers is not None else math.ceil(len(stack) / 2)
    idx = student_indices(len(stack), n, from_layers)
    student = copy.deepcopy(teacher)
    _set_path(student, path, nn.ModuleList([copy.deepcopy(stack[i]) for i in idx]))
    for mod in student.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = n
    for p in student.parameters():
        p.requires_grad_(True)
    return student, path, idx


def _last_hidden(stack: nn.ModuleList, store: dict, key: str):
    def hook(_m, _args, out):
        store[key] = out[0] if isinstance(out, (tuple, list)) else out

    return stack[-1].register_forward_hook(hook)


def distill_train(student: nn.Module, teacher: nn.Module, task, cfg: DistillConfig, *, epochs: int | None = None,
                  lr: float | None = None, student_stack: nn.ModuleList | None = None,
                  teacher_stack: nn.ModuleList | None = None, desc: str = "distill",
                  on_epoch=None) -> list[float]:
    """Train ``student`` against the frozen ``teacher`` with the triple loss (module docstring) on
    ``task.train_batches(epoch)``; returns the mean loss of each epoch. ``on_epoch(epoch, student)``
    (optional) is called after each epoch (0-based) with the student in eval mode, e.g. to measure
    it (``examples/minilm/distill_sweep.py``); it must not train it."""
    epochs = cfg.epochs if epochs is None else epochs
    lr = cfg.lr if lr is None else lr
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    if epochs <= 0 or not params:
        return []
    steps = epochs * sum(1 for _ in task.train_batches(0))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    T = cfg.temperature
    hidden: dict = {}
    hooks = []
    if cfg.weight_cosine > 0 and student_stack is not None and teacher_stack is not None:
        hooks = [_last_hidden(student_stack, hidden, "s"), _last_hidden(teacher_stack, hidden, "t")]
    losses = []
    try:
        for epoch in range(epochs):
            student.train()
            total, count = 0.0, 0
            bar = progress(task.train_batches(epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                           verbose=task.verbose, leave=False, position=1)
            for inputs, labels in bar:
                with torch.no_grad():
                    z_t = teacher(*inputs)
                z_s = student(*inputs)
                out_loss = None
                if cfg.weight_output > 0:
                    out_loss = (1.0 - nn.functional.cosine_similarity(z_s.reshape(len(z_s), -1),
                                                                      z_t.reshape(len(z_t), -1), dim=-1)).mean()
                if labels is None:  # embeddings: in-batch similarity logits against the teacher's
                    ref = z_t.detach()
                    z_s, z_t = cfg.similarity_scale * z_s @ ref.T, cfg.similarity_scale * ref @ ref.T
                loss = z_s.new_zeros(())
                if cfg.weight_kl > 0:
                    kl = nn.functional.kl_div(nn.functional.log_softmax(z_s / T, dim=-1),
                                              nn.functional.log_softmax(z_t / T, dim=-1),
                                              log_target=True, reduction="batchmean")
                    loss = loss + cfg.weight_kl * kl * T * T
                if cfg.weight_task > 0 and labels is not None:
                    loss = loss + cfg.weight_task * nn.functional.cross_entropy(z_s, labels)
                if out_loss is not None:
                    loss = loss + cfg.weight_output * out_loss
                if hooks and "s" in hidden and "t" in hidden:
                    hs, ht = hidden["s"], hidden["t"].detach()
                    cos = nn.functional.cosine_similarity(hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]),
                                                          dim=-1)
                    loss = loss + cfg.weight_cosine * (1.0 - cos).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
                count += 1
            bar.close()
            losses.append(total / max(count, 1))
            task.log(f"  {desc} epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
            if on_epoch is not None:
                student.eval()
                on_epoch(epoch, student)
    finally:
        for h in hooks:
            h.remove()
        student.eval()
    return losses


@register("distill", DistillConfig)
def distill(state: CompressionState, cfg: DistillConfig, task) -> dict:
    """Replace ``state.model`` by a distilled student (module docstring). Must run before any
    stage that stores weights compressed (prune, quantize, int8).

    Raises ValueError (before any training): a student deeper than the teacher, no block list,
    an earlier weight-storing stage."""
    if state.masks or state.codebooks or state.int8:
        raise ValueError("distill: must run before prune, quantize and int8 (it builds a new model)")
    teacher = state.model
    _, t_stack = find_layer_stack(teacher, cfg.layers)
    student, path, idx = make_student(teacher, cfg.student_layers, cfg.layers, cfg.from_layers)
    _, s_stack = find_layer_stack(student, path)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    losses = distill_train(student, teacher, task, cfg, student_stack=s_stack, teacher_stack=t_stack)
    state.model = student
    return {"student": {"layers": len(idx), "from_teacher_layers": idx, "teacher_layers": len(t_stack),
                        "parameters": sum(p.numel() for p in student.parameters()), "teacher_parameters": n_teacher,
                        "epoch_losses": [float(x) for x in losses]}}
