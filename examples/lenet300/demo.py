"""The walking skeleton end to end: train (or reuse) LeNet-300-100 on MNIST, compress it with
`pyserve compress`, serve it with `pyserve serve`, classify the whole MNIST test set through
tritonclient.grpc (a stock KServe v2 client), and compare with the artifact run offline.

    python examples/lenet300/demo.py [--out out/demo] [--batch-size 1000]

Ends with one line:
    demo: served_accuracy=... offline_accuracy=... fp32_bytes=... artifact_bytes=... compression=...x
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
READY = re.compile(r"serving .* on (\S+):(\d+)")


def start_server(repository: Path, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `pyserve serve` on a free port; returns the process and its HOST:PORT."""
    proc = subprocess.Popen([sys.executable, "-m", "pyserve", "serve", "--model-repository", str(repository),
                             "--host", "127.0.0.1", "--grpc-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []

    def pump() -> None:  # echo the server's log and catch its ready line
        for line in proc.stdout:
            print(f"  [server] {line.rstrip()}", flush=True)
            m = READY.search(line)
            if m and not found:
                found.append(f"127.0.0.1:{m.group(2)}")

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found:
        if proc.poll() is not None:
            raise SystemExit(f"demo: pyserve serve exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("demo: pyserve serve was not ready in time")
        time.sleep(0.1)
    return proc, found[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo", help="working directory for the artifact and repository")
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()

    import tritonclient.grpc as grpcclient

    import pyserve
    from pyserve.artifact import read_manifest
    from pyserve.datasets import mnist

    out = Path(args.out)
    repository = out / "repository"
    artifact = repository / "lenet300" / "1" / "model.pyserve"
    print("demo: compressing LeNet-300-100 (pyserve compress)", flush=True)
    subprocess.run([sys.executable, "-m", "pyserve", "compress", str(HERE / "recipe.yaml"), "-o", str(artifact)],
                   check=True)
    manifest = read_manifest(artifact)
    (inp,), (outp,) = manifest.inputs, manifest.outputs
    test = mnist().test

    print("demo: offline accuracy (pyserve.load)", flush=True)
    import torch

    module = pyserve.load(artifact)
    offline = []
    with torch.inference_mode():
        for i in range(0, len(test), args.batch_size):
            offline.append(module(torch.from_numpy(test.images[i:i + args.batch_size])).argmax(1).numpy())
    offline_acc = float((np.concatenate(offline) == test.labels).mean())

    print("demo: serving (pyserve serve) and classifying the MNIST test set with tritonclient.grpc", flush=True)
    proc, url = start_server(repository)
    try:
        client = grpcclient.InferenceServerClient(url)
        if not client.is_model_ready("lenet300"):
            raise SystemExit("demo: model lenet300 is not ready")
        served = []
        for i in range(0, len(test), args.batch_size):
            batch = test.images[i:i + args.batch_size]
            x = grpcclient.InferInput(inp.name, list(batch.shape), inp.datatype)
            x.set_data_from_numpy(batch)
            result = client.infer("lenet300", [x], outputs=[grpcclient.InferRequestedOutput(outp.name)])
            served.append(result.as_numpy(outp.name).argmax(1))
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit("demo: server did not stop within 60 s of SIGTERM")
    if code != 0:
        raise SystemExit(f"demo: server exited with code {code} after SIGTERM")
    served_acc = float((np.concatenate(served) == test.labels).mean())
    fp32_bytes = int(manifest.stats["fp32_bytes"])
    artifact_bytes = os.path.getsize(artifact)
    print(f"demo: served_accuracy={served_acc:.4f} offline_accuracy={offline_acc:.4f} fp32_bytes={fp32_bytes} "
          f"artifact_bytes={artifact_bytes} compression={fp32_bytes / artifact_bytes:.1f}x")
    return 0 if served_acc == offline_acc else 1


if __name__ == "__main__":
    sys.exit(main())
