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


# --- fault injection for traffic tests and benchmarks ------------------------------------------------


class FaultyBackend:
    """A backend that wraps a real pyserve artifact and misbehaves on purpose.

    Its artifact file (``model.faulty``) is YAML: ``{artifact: PATH, mode: fail | slow | ok, factor: N,
    fail_if_exists: PATH}``. ``fail``: every request fails (UNAVAILABLE); ``slow``: the model runs
    ``factor`` times per batch (a model ``factor`` times as expensive, in real CPU time); ``sleep``: the
    model runs once, then the answer waits ``factor - 1`` times as long (``factor`` times as slow without
    using the CPU, like a remote or I/O-bound model); ``ok``: the
    wrapped model as it is. With ``fail_if_exists``, requests also fail while that file exists (a
    variant that starts failing in the middle of a run). With ``hang_if_exists``, requests never
    answer while that file exists (a hung model; its warm-up at load is not affected when the file is
    created after the load).
    """

    platform = "pyserve-faulty"

    def __init__(self, path, *, executor=None) -> None:
        self.path = Path(path)
        self.executor = executor
        self.inner = None
        self.mode = "ok"
        self.factor = 1
        self.fail_flag = None
        self.hang_flag = None

    @property
    def ready(self) -> bool:
        return self.inner is not None and self.inner.ready

    @property
    def signature(self):
        return self.inner.signature

    async def load(self) -> None:
        import yaml

        from pyserve.backends import create_backend

        spec = yaml.safe_load(self.path.read_text())
        self.mode = spec.get("mode", "ok")
        self.factor = int(spec.get("factor", 1))
        self.fail_flag = Path(spec["fail_if_exists"]) if spec.get("fail_if_exists") else None
        self.hang_flag = Path(spec["hang_if_exists"]) if spec.get("hang_if_exists") else None
        inner = create_backend("pyserve", Path(spec["artifact"]), executor=self.executor)
        await inner.load()
        self.inner = inner

    async def infer(self, batch):
        from pyserve.protocol.errors import Unavailable

        if self.mode == "fail" or (self.fail_flag is not None and self.fail_flag.exists()):
            return [Unavailable("injected failure (FaultyBackend mode fail)") for _ in batch]
        import asyncio
        import time

        if self.hang_flag is not None and self.hang_flag.exists():
            await asyncio.Event().wait()  # never set
        t0 = time.perf_counter()
        out = await self.inner.infer(batch)
        if self.mode == "sleep":
            await asyncio.sleep((self.factor - 1) * (time.perf_counter() - t0))
        for _ in range(self.factor - 1 if self.mode == "slow" else 0):
            out = await self.inner.infer(batch)
        return out

    async def unload(self) -> None:
        if self.inner is not None:
            await self.inner.unload()
            self.inner = None


def register_faulty_backend() -> None:
    """Register :class:`FaultyBackend` as backend ``faulty`` (artifact file ``model.faulty``)."""
    from pyserve.backends import register_backend

    register_backend("faulty", FaultyBackend, "model.faulty")


def write_faulty_model(repo: str | Path, name: str, artifact: str | Path, mode: str, factor: int = 1,
                       fail_if_exists: str | Path | None = None, hang_if_exists: str | Path | None = None) -> None:
    """``repo/name/1/model.faulty`` wrapping ``artifact`` (see :class:`FaultyBackend`)."""
    d = Path(repo) / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text("backend: faulty\nmax_batch_size: 64\n")
    flag = f"fail_if_exists: {Path(fail_if_exists).resolve()}\n" if fail_if_exists else ""
    flag += f"hang_if_exists: {Path(hang_if_exists).resolve()}\n" if hang_if_exists else ""
    (d / "1" / "model.faulty").write_text(f"artifact: {Path(artifact).resolve()}\nmode: {mode}\nfactor: {factor}\n"
                                          + flag)
