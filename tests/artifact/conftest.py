"""Shared fixtures of the artifact tests."""

import numpy as np
import pytest
import torch
from torch import nn

from pyserve import artifact
from pyserve.ops import quantize_per_channel


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 32)
        self.b = nn.Linear(32, 24)
        self.c = nn.Linear(24, 16, bias=False)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """a: int8; b: pruned (70%) + 4-bit codebook; c: pruned raw values. Input [B, S, 48]."""
    torch.manual_seed(0)
    net = Net().eval()
    enc = {}
    with torch.no_grad():
        q, s = quantize_per_channel(net.a.weight.numpy())
        net.a.weight.copy_(torch.from_numpy(q.astype(np.float32) * s[:, None]))
        enc["a.weight"] = artifact.encode_int8(q, s)
        wb = net.b.weight.numpy().copy()
        wb[np.abs(wb) < np.quantile(np.abs(wb), 0.7)] = 0
        cb = np.concatenate([[0.0], np.linspace(-0.2, 0.2, 15)]).astype(np.float32)
        nz = wb != 0
        wb[nz] = cb[1:][np.abs(wb[nz][:, None] - cb[1:][None]).argmin(1)]
        net.b.weight.copy_(torch.from_numpy(wb))
        enc["b.weight"] = artifact.encode_sparse(wb, index_bits=5, codebook=cb, entropy="huffman")
        wc = net.c.weight.numpy().copy()
        wc[np.abs(wc) < np.quantile(np.abs(wc), 0.8)] = 0
        net.c.weight.copy_(torch.from_numpy(wc))
        enc["c.weight"] = artifact.encode_sparse(wc, index_bits=4, entropy="none")
    path = tmp_path_factory.mktemp("k") / "net.pyserve"
    artifact.save(path, net, (torch.randn(2, 5, 48),), model_name="net", encodings=enc, dynamic_axes=((0, 1),))
    return path, net
