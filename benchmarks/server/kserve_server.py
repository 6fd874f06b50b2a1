"""The KServe Python server serving LeNet-300-100 (the benchmark's peer), run in its own virtual
environment (kserve pins its own grpcio/protobuf)::

    .venv-kserve/bin/python benchmarks/server/kserve_server.py --weights W.npz --grpc-port 8011 --http-port 8010

The model is the same network pyserve serves (784-300-100-10, ReLU), the same fp32 weights, run by
torch under ``inference_mode`` as pyserve's backend runs it. Input ``images`` FP32 [-1, 784], output
``logits`` FP32 [-1, 10], answered with raw output contents (what tritonclient and perf_analyzer read).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class LeNet300(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 300)
        self.fc2 = torch.nn.Linear(300, 100)
        self.fc3 = torch.nn.Linear(100, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class KServeLeNet(Model):
    def __init__(self, name: str, weights: str) -> None:
        super().__init__(name)
        self.weights = weights
        self.net = None
        self.load()

    def load(self) -> bool:
        w = np.load(self.weights)
        net = LeNet300().eval()
        net.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files})
        self.net = net
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        with torch.inference_mode():
            y = self.net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        out = InferOutput(name="logits", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=True)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--name", default="lenet300")
    p.add_argument("--grpc-port", type=int, default=8011)
    p.add_argument("--http-port", type=int, default=8010)
    args = p.parse_args()
    ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1).start(
        [KServeLeNet(args.name, args.weights)])


if __name__ == "__main__":
    main()
