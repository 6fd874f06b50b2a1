"""Two real variants of LeNet-300-100 for traffic experiments, built in seconds.

``build_variants(repo)`` trains LeNet-300-100 briefly on a slice of real MNIST, writes it to the
model repository as ``lenet300/1/model.pyserve`` (fp32, uncompressed), then prunes it by magnitude
(fc1/fc2 90%, fc3 70%) and shares the surviving weights of each layer through 4-bit k-means codebooks
(Deep Compression's first two stages, without retraining), and writes that as
``lenet300c/1/model.pyserve`` (sparse + codebook + Huffman encodings). Both take ``images`` FP32
``[-1, 784]`` and answer ``logits`` FP32 ``[-1, 10]``; they disagree on a few percent of inputs,
which is what a shadow or an interleaving experiment should see.

    python examples/lenet300/variants.py REPO_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIG = "max_batch_size: 64\n"


def _lenet():
    sys.path.insert(0, str(HERE))
    try:
        from model import LeNet300
    finally:
        sys.path.pop(0)
    return LeNet300()


def build_variants(repo: str | Path, *, n_train: int = 4000, epochs: int = 3, seed: int = 0) -> dict:
    """Write ``lenet300`` and ``lenet300c`` into ``repo``; returns ``{"test": (images, labels)}`` (1,000
    MNIST test images) and the two torch modules (``"fp32"``, ``"compressed"``)."""
    import torch

    from pyserve.artifact import encode_sparse, save
    from pyserve.compress import kmeans_1d
    from pyserve.datasets import mnist

    torch.manual_seed(seed)
    data = mnist()
    x = torch.from_numpy(data.train.images[:n_train])
    y = torch.from_numpy(data.train.labels[:n_train])
    model = _lenet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    repo = Path(repo)
    example = (torch.from_numpy(data.test.images[:2]),)
    for name in ("lenet300", "lenet300c"):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.yaml").write_text(CONFIG)
    save(repo / "lenet300" / "1" / "model.pyserve", model, example, model_name="lenet300",
         input_names=["images"], output_names=["logits"])

    compressed = _lenet()
    compressed.load_state_dict(model.state_dict())
    encodings = {}
    with torch.no_grad():
        for layer, sparsity in (("fc1", 0.9), ("fc2", 0.9), ("fc3", 0.7)):
            w = getattr(compressed, layer).weight
            a = w.numpy().astype(np.float32)
            keep = np.abs(a) > np.quantile(np.abs(a), sparsity)
            centroids, labels = kmeans_1d(a[keep], 15)
            q = np.zeros_like(a)
            q[keep] = centroids[labels]
            w.copy_(torch.from_numpy(q))
            encodings[f"{layer}.weight"] = encode_sparse(q, codebook=np.concatenate([[0.0], centroids]).astype(np.float32))
    compressed.eval()
    save(repo / "lenet300c" / "1" / "model.pyserve", compressed, example, model_name="lenet300c",
         input_names=["images"], output_names=["logits"], encodings=encodings)
    return {"test": (data.test.images[:1000], data.test.labels[:1000]), "fp32": model, "compressed": compressed}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        raise SystemExit(2)
    out = build_variants(sys.argv[1])
    images, labels = out["test"]
    import torch

    with torch.no_grad():
        for k in ("fp32", "compressed"):
            acc = (out[k](torch.from_numpy(images)).argmax(1).numpy() == labels).mean()
            print(f"{k}: top-1 on 1,000 MNIST test images {acc:.3f}")
