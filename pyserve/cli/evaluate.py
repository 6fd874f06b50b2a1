"""``pyserve evaluate ARTIFACT --data mnist [--batch-size N]``: top-1 accuracy of an artifact on a
dataset's test split, computed with the artifact loaded exactly as :func:`pyserve.load` loads it."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1 accuracy of a .pyserve artifact on a dataset's test split",
                       description=__doc__)
    p.add_argument("artifact", help=".pyserve file")
    p.add_argument("--data", required=True, help="built-in dataset name (mnist)")
    p.add_argument("--batch-size", type=int, default=1000, help="images per forward pass (default 1000)")
    p.set_defaults(func=run)


def evaluate(module, images, labels, batch_size: int) -> tuple[int, int]:
    """(correct, total) top-1 predictions of ``module`` on ``images`` [N, ...] float32 against ``labels``
    [N] int64, in batches of ``batch_size``."""
    import torch

    correct = 0
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out = module(torch.from_numpy(images[i:i + batch_size]))
            if isinstance(out, (tuple, list)):
                out = out[0]
            correct += int((out.argmax(1).numpy() == labels[i:i + batch_size]).sum())
    return correct, len(images)


def run(args: argparse.Namespace) -> int:
    from pyserve import datasets, load
    from pyserve.artifact import ArtifactError, read_manifest
    from pyserve.cli import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.data not in datasets.DATASETS:
        raise UsageError(f"--data: unknown dataset {args.data!r}; expected one of {', '.join(datasets.DATASETS)}")
    try:
        manifest = read_manifest(args.artifact)
    except ArtifactError as exc:
        raise UsageError(str(exc)) from None
    try:
        test = datasets.load(args.data).test
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--data {args.data}: {exc}") from None
    if len(manifest.inputs) != 1:
        raise UsageError(f"{args.artifact}: the model takes {len(manifest.inputs)} inputs; "
                         f"--data {args.data} gives one (images)")
    spec = manifest.inputs[0]
    data_shape = [-1, *test.images.shape[1:]]
    if len(spec.shape) != len(data_shape) or any(s not in (-1, d) for s, d in zip(spec.shape[1:], data_shape[1:])):
        raise UsageError(f"{args.artifact}: input {spec.name} has shape {list(spec.shape)}, "
                         f"--data {args.data} gives {data_shape}")
    if spec.datatype != "FP32":
        raise UsageError(f"{args.artifact}: input {spec.name} is {spec.datatype}, --data {args.data} gives FP32")
    try:
        module = load(args.artifact)
    except ArtifactError as exc:
        raise UsageError(str(exc)) from None
    correct, total = evaluate(module, test.images, test.labels, args.batch_size)
    print(f"{args.artifact}: top-1 accuracy {correct / total:.4f} ({correct}/{total}) on {args.data} test; "
          f"error {1 - correct / total:.2%}")
    return 0
