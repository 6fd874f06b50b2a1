"""Fixtures for the export tests: LeNet-300-100 trained briefly on real MNIST, written as an fp32
artifact and as an int8 artifact (every Linear weight quantized per channel with
pyserve.ops.quantize_per_channel and stored with encode_int8, the contract the `int8` method
follows), with and without static activation scales from a calibration pass."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

from export_helpers import quantize_linears  # noqa: E402


def _lenet_class():
    spec = importlib.util.spec_from_file_location("_lenet300_model", ROOT / "examples/lenet300/model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.LeNet300


@dataclass
class LeNetArtifacts:
    module: object              # the trained fp32 torch module
    int8_module: object         # the same with dequantized int8 weights (what the int8 artifact's graph holds)
    fp32: Path                  # .pyserve, raw fp32
    int8: Path                  # .pyserve, int8 weights, no activation scales
    int8_static: Path           # .pyserve, int8 weights + static input scales
    input_scales: dict          # layer name -> static activation scale
    quant: dict                 # layer name -> (q int8 [N, K], scale fp32 [N])
    test_images: np.ndarray     # MNIST test split, float32 [10000, 784]
    test_labels: np.ndarray     # int64 [10000]
    checkpoint: Path            # state_dict of ``module`` (for recipe sources)


@pytest.fixture(scope="session")
def lenet(tmp_path_factory) -> LeNetArtifacts:
    torch = pytest.importorskip("torch")
    from pyserve import datasets
    from pyserve.artifact import encode_int8, save

    data = datasets.load("mnist")
    torch.manual_seed(0)
    model = _lenet_class()()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = torch.from_numpy(data.train.images)
    y_all = torch.from_numpy(data.train.labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is ~10x faster than two on a loaded 2-core machine
    try:
        for i in range(0, 50000, 100):  # one epoch: ~94-95% test accuracy
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_all[i:i + 100]), y_all[i:i + 100])
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    d = tmp_path_factory.mktemp("lenet")
    ckpt = d / "lenet.pt"
    torch.save(model.state_dict(), ckpt)
    example = (torch.from_numpy(data.test.images[:4]),)
    kw = dict(model_name="lenet", input_names=["images"], output_names=["logits"])
    save(d / "fp32.pyserve", model, example, **kw)

    names = ["fc1", "fc2", "fc3"]
    quant, qmod = quantize_linears(model, names)
    # static activation scales: max |input| of each Linear over 2,000 validation images / 127
    seen = {}
    hooks = [qmod.get_submodule(n).register_forward_hook(
        lambda m, inp, out, n=n: seen.__setitem__(n, float(inp[0].abs().max()))) for n in names]
    with torch.no_grad():
        qmod(torch.from_numpy(data.valid.images[:2000]))
    for h in hooks:
        h.remove()
    input_scales = {n: seen[n] / 127.0 for n in names}
    save(d / "int8.pyserve", qmod, example, **kw,
         encodings={f"{n}.weight": encode_int8(*quant[n]) for n in names})
    save(d / "int8_static.pyserve", qmod, example, **kw,
         encodings={f"{n}.weight": encode_int8(*quant[n], input_scale=input_scales[n]) for n in names})
    return LeNetArtifacts(model, qmod, d / "fp32.pyserve", d / "int8.pyserve", d / "int8_static.pyserve",
                          input_scales, quant, data.test.images, data.test.labels, ckpt)
