"""Methods distill and lowrank on small models: the student's initialisation, the triple loss
training, SVD factorization against NumPy's SVD, and the errors raised before any work."""

import numpy as np
import pytest
import torch
from torch import nn

from pyserve.compress.distill import DistillConfig, distill, make_student, student_indices
from pyserve.compress.lowrank import LowRankConfig, factorize, lowrank, rank_for_energy
from pyserve.compress.methods import CompressionState


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.fc(h))


class Deep(nn.Module):
    def __init__(self, d=16, depth=6, classes=4):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


class ToyTask:
    """Labelled 4-class data; train_batches yields (inputs, labels)."""

    verbose = False

    def __init__(self, n=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() * 2 + (self.x[:, 1] > 0).long()

    def train_batches(self, epoch):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(perm), 32):
            idx = perm[i:i + 32]
            yield (self.x[idx],), self.y[idx]

    def log(self, msg):
        pass


def test_student_takes_every_other_teacher_layer():
    torch.manual_seed(0)
    teacher = Deep()
    student, path, idx = make_student(teacher)
    assert path == "blocks" and idx == [0, 2, 4] and len(student.blocks) == 3
    for j, i in enumerate(idx):
        assert torch.equal(student.blocks[j].fc.weight, teacher.blocks[i].fc.weight)
        assert student.blocks[j].fc.weight.data_ptr() != teacher.blocks[i].fc.weight.data_ptr()
    assert torch.equal(student.inp.weight, teacher.inp.weight) and len(teacher.blocks) == 6
    assert student_indices(6, 2) == [0, 3] and student_indices(6, 6) == list(range(6))


def test_student_deeper_than_teacher_is_refused_before_training():
    teacher = Deep(depth=4)
    state = CompressionState(teacher)
    with pytest.raises(ValueError, match="cannot be deeper than the teacher"):
        distill(state, DistillConfig(student_layers=5, epochs=1), ToyTask())
    assert state.model is teacher
    with pytest.raises(ValueError, match="student_layers"):
        DistillConfig(student_layers=0)
    with pytest.raises(ValueError, match="repeated blocks"):
        distill(CompressionState(nn.Sequential(nn.Linear(2, 2))), DistillConfig(), ToyTask())


def test_distillation_triple_loss_moves_student_towards_teacher():
    torch.manual_seed(0)
    teacher = Deep()
    task = ToyTask()
    # train the teacher a little so it has something to teach
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(3):
        for (x,), y in task.train_batches(0):
            opt.zero_grad()
            nn.functional.cross_entropy(teacher(x), y).backward()
            opt.step()
    teacher.eval()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    state = CompressionState(teacher)
    student0, _, _ = make_student(teacher)
    with torch.no_grad():
        gap0 = nn.functional.mse_loss(student0(task.x), teacher(task.x)).item()
    rep = distill(state, DistillConfig(epochs=4, lr=3e-3, temperature=2.0), task)
    student = state.model
    assert len(student.blocks) == 3 and rep["student"]["from_teacher_layers"] == [0, 2, 4]
    losses = rep["student"]["epoch_losses"]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        gap = nn.functional.mse_loss(student(task.x), teacher(task.x)).item()
    assert gap < gap0
    for k, v in teacher.state_dict().items():  # the teacher stayed frozen
        assert torch.equal(v, frozen[k])


def test_factorize_equals_truncated_numpy_svd():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    w = lin.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    for r in (1, 4, 10):
        seq = factorize(lin, r)
        approx = (seq[1].weight.double() @ seq[0].weight.double()).detach().numpy()
        np.testing.assert_allclose(approx, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-5)
        x = torch.randn(3, 12)
        expected = x.double().numpy() @ ((u[:, :r] * s[:r]) @ vt[:r]).T + lin.bias.detach().double().numpy()
        np.testing.assert_allclose(seq(x).detach().double().numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        factorize(lin, 11)


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 1.0) == 3


def test_lowrank_stage_and_its_errors():
    torch.manual_seed(0)
    model = Deep(d=32)
    with pytest.raises(ValueError, match="above min"):
        lowrank(CompressionState(model), LowRankConfig(rank=33, include=("blocks.*",)), ToyTask())
    with pytest.raises(ValueError, match="exactly one"):
        LowRankConfig(rank=2, energy=0.9)
    state = CompressionState(model)
    rep = lowrank(state, LowRankConfig(rank=4, include=("blocks.*.fc",), finetune_epochs=1, lr=1e-3), ToyTask())
    new = state.model
    assert all(rep[f"blocks.{i}.fc"]["factorized"] for i in range(6))
    assert isinstance(new.blocks[0].fc, nn.Sequential) and new.blocks[0].fc[0].weight.shape == (4, 32)
    assert isinstance(model.blocks[0].fc, nn.Linear)  # the teacher is untouched
    # a rank that saves nothing leaves the layer dense
    rep = lowrank(CompressionState(Deep(d=32)), LowRankConfig(rank=20, include=("blocks.0.fc",)), ToyTask())
    assert rep["blocks.0.fc"]["factorized"] is False


def test_output_cosine_loss_alone_aligns_outputs():
    """weight_output only (no KL, no hidden-state loss): the student's outputs turn towards the
    teacher's (mean cosine rises)."""
    from pyserve.compress.distill import distill_train

    torch.manual_seed(0)
    teacher = Deep().eval()
    student, _, _ = make_student(teacher)
    task = ToyTask()

    def mean_cos():
        with torch.no_grad():
            return nn.functional.cosine_similarity(student(task.x), teacher(task.x), dim=-1).mean().item()

    before = mean_cos()
    cfg = DistillConfig(weight_kl=0, weight_task=0, weight_cosine=0, weight_output=1.0, epochs=3, lr=3e-3)
    distill_train(student, teacher, task, cfg)
    assert mean_cos() > max(before, 0.9)
    with pytest.raises(ValueError, match="at least one"):
        DistillConfig(weight_kl=0, weight_task=0, weight_cosine=0, weight_output=0)


def test_student_from_named_teacher_layers():
    torch.manual_seed(0)
    teacher = Deep()
    student, path, idx = make_student(teacher, from_layers=(0, 3, 5))
    assert path == "blocks" and idx == [0, 3, 5] and len(student.blocks) == 3
    for s_block, t in zip(student.blocks, (0, 3, 5)):
        torch.testing.assert_close(s_block.fc.weight, teacher.blocks[t].fc.weight)
    cfg = DistillConfig(student_layers=3, from_layers=(0, 3, 5))
    cfg.check(teacher, None)
    with pytest.raises(ValueError, match=r"from_layers: blocks \[6\] are not blocks of the teacher \(0..5\)"):
        DistillConfig(from_layers=(0, 6)).check(teacher, None)
    with pytest.raises(ValueError, match="from_layers: 2 blocks given for student_layers 3"):
        DistillConfig(student_layers=3, from_layers=(0, 5))
    with pytest.raises(ValueError, match="from_layers: must be increasing"):
        DistillConfig(from_layers=(3, 1))
    state = CompressionState(teacher)
    rep = distill(state, DistillConfig(from_layers=(1, 5), epochs=0), ToyTask())
    assert rep["student"]["from_teacher_layers"] == [1, 5] and len(state.model.blocks) == 2
