"""``pyserve export SOURCE --to onnx|torch|tensorrt -o OUT``: a model as a deployable file.

SOURCE is a .pyserve artifact, a torch.export .pt2 or a recipe .yaml (its model.factory with the
trained model.checkpoint). ``--repository DIR --model NAME --version N`` writes
DIR/NAME/N/model.{onnx,pt2,plan} and DIR/NAME/config.pbtxt, which ``pyserve serve`` loads.
Every argument is checked before any work (bad input: one line on stderr, exit 2); the output is
written to a temporary file and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model or artifact to ONNX, torch.export or a TensorRT engine",
                       description=__doc__.splitlines()[0])
    p.add_argument("source", help=".pyserve artifact, torch.export .pt2 or recipe .yaml")
    p.add_argument("--to", required=True, choices=["onnx", "torch", "tensorrt"], help="output format")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="file to write (--to torch: .pt2 for torch.export, .pt for TorchScript)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="fp32 (default), fp16 (graph converted, fp32 I/O), int8 (Q/DQ with the artifact's scales)")
    p.add_argument("--dynamic-batch", action="store_true", help="keep dimension 0 (the batch) dynamic; default: 1")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; int8 needs >= 13)")
    p.add_argument("--repository", type=Path, default=None, metavar="DIR", help="model repository to write into")
    p.add_argument("--model", default=None, metavar="NAME", help="with --repository: the model's name")
    p.add_argument("--version", type=int, default=1, metavar="N", help="with --repository: version (default 1)")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="with --dynamic-batch: config max_batch_size and TensorRT profile max (default 64)")
    p.add_argument("--min-batch", type=int, default=1, help="TensorRT profile min batch (default 1)")
    p.add_argument("--opt-batch", type=int, default=8, help="TensorRT profile opt batch (default 8)")
    p.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT builder workspace limit in MiB")
    p.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache file (read and updated)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pyserve.cli import UsageError
    from pyserve.export import ExportError, ExportRequest, check_request, run_export

    if args.repository is None and (args.model is not None):
        raise UsageError("--model needs --repository DIR")
    if args.workspace_mb < 1:
        raise UsageError(f"--workspace-mb must be >= 1, got {args.workspace_mb}")
    req = ExportRequest(source=Path(args.source), to=args.to, output=args.output, repository=args.repository,
                        model=args.model, version=args.version, precision=args.precision,
                        dynamic_batch=args.dynamic_batch, opset=args.opset, max_batch_size=args.max_batch_size,
                        min_batch=args.min_batch, opt_batch=args.opt_batch,
                        workspace_bytes=args.workspace_mb << 20, timing_cache=args.timing_cache)
    try:
        check_request(req)
        result = run_export(req)
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    size = result.path.stat().st_size
    print(f"pyserve export: wrote {result.path} ({result.format}, {result.precision}, {size:,} bytes, "
          f"{result.seconds:.1f} s)")
    if result.config_path is not None:
        print(f"pyserve export: wrote {result.config_path}")
    for note in result.notes:
        print(f"pyserve export: {note}")
    return 0
