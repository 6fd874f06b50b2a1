"""``pyserve infer``: send one inference request to a KServe v2 gRPC server and print the outputs.

Inputs come from ``.npy`` files (``--input``, repeatable); their names default to the model's inputs
in order (asked with ModelMetadata). Prints each output's name, datatype, shape and values, plus
the argmax of every row for 2-D floating-point outputs. Uses tritonclient.grpc when it is installed,
pyserve's own stubs otherwise (``--client`` forces one). A server error is printed as one line
(``STATUS: message``) with exit code 2.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyserve.cli import add_tls_arguments, auth_metadata, grpc_channel, rpc_error_line, tls_files
from pyserve.cli.main import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "infer",
        help="send one inference request to a KServe v2 gRPC server",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--url", default="localhost:8001", help="server HOST:PORT (default localhost:8001)")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--model-version", default="", help="model version (default: the one the server serves)")
    p.add_argument("--input", action="append", required=True, metavar="FILE.npy", help="input tensor; repeat per input")
    p.add_argument("--input-name", action="append", default=[], metavar="NAME",
                   help="name of each --input, in order (default: the model's inputs in order)")
    p.add_argument("--output-name", action="append", default=[], metavar="NAME",
                   help="request only these outputs (default: all)")
    p.add_argument("--output", metavar="FILE.npy", help="save the first output to this file")
    p.add_argument("--id", default="", help="request id (echoed by the server)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each RPC")
    p.add_argument("--auth-token-file", metavar="FILE", default=None,
                   help="send 'authorization: Bearer <token>' with the first token of FILE (for a server "
                   "started with --auth-token-file)")
    add_tls_arguments(p)
    p.add_argument("--client", choices=["auto", "tritonclient", "pyserve"], default="auto",
                   help="gRPC client library (default: tritonclient if installed)")
    p.set_defaults(func=run)


@dataclass
class _Output:
    name: str
    datatype: str
    data: np.ndarray


def _load_inputs(paths: list[str]) -> list[np.ndarray]:
    arrays = []
    for path in paths:
        try:
            arr = np.load(Path(path), allow_pickle=False)
        except FileNotFoundError:
            raise UsageError(f"--input {path}: no such file") from None
        except (OSError, ValueError, EOFError):
            # numpy's own message suggests allow_pickle=True, which pyserve never uses
            raise UsageError(f"--input {path}: not a .npy file of a numeric array") from None
        if not isinstance(arr, np.ndarray):
            raise UsageError(f"--input {path}: holds several arrays (.npz); give one .npy per input")
        arrays.append(arr)
    return arrays


def _datatype(arr: np.ndarray, path: str) -> str:
    from pyserve import dtypes

    try:
        return dtypes.from_numpy(arr.dtype).name
    except ValueError as exc:
        raise UsageError(f"--input {path}: {exc}") from None


def _names(args, model_inputs: list[str]) -> list[str]:
    if args.input_name:
        if len(args.input_name) != len(args.input):
            raise UsageError(f"{len(args.input)} --input file(s) but {len(args.input_name)} --input-name(s)")
        return list(args.input_name)
    if len(args.input) != len(model_inputs):
        raise UsageError(
            f"model {args.model!r} has {len(model_inputs)} input(s) ({', '.join(model_inputs)}); "
            f"{len(args.input)} --input file(s) given"
        )
    return model_inputs


def _infer_tritonclient(args, arrays: list[np.ndarray]) -> tuple[str, list[_Output]]:
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    try:
        tls = {}
        if args.tls is not None:  # tritonclient reads the files itself
            tls = {"ssl": True, "root_certificates": args.tls_ca, "private_key": args.tls_key,
                   "certificate_chain": args.tls_cert}
        client = tc.InferenceServerClient(args.url, **tls)
        headers = dict(args.metadata) or None
        md = client.get_model_metadata(args.model, args.model_version, headers=headers, client_timeout=args.timeout_s)
        names = _names(args, [t.name for t in md.inputs])
        inputs = []
        for name, arr, path in zip(names, arrays, args.input, strict=True):
            datatype = _datatype(arr, path)
            if datatype == "BYTES":
                arr = arr.astype(object)
            t = tc.InferInput(name, list(arr.shape), datatype)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        outputs = [tc.InferRequestedOutput(n) for n in args.output_name] or None
        result = client.infer(args.model, inputs, model_version=args.model_version, outputs=outputs,
                              request_id=args.id, headers=headers, client_timeout=args.timeout_s)
    except InferenceServerException as exc:
        status = str(exc.status() or "").removeprefix("StatusCode.")
        raise UsageError(rpc_error_line(status, exc.message(), args.tls) if status else str(exc.message())) from None
    response = result.get_response()
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()
              if v.WhichOneof("parameter_choice")}
    return (response.model_version, [_Output(o.name, o.datatype, result.as_numpy(o.name)) for o in response.outputs],
            params)


def _infer_pyserve(args, arrays: list[np.ndarray]) -> tuple[str, list[_Output]]:
    import grpc

    from pyserve.protocol import codec
    from pyserve.protocol.types import InferRequest, RequestedOutput, Tensor

    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    with grpc_channel(args.url, args.tls, options) as channel:
        stub = codec.inference_stub(channel)
        try:
            md = codec.decode_model_metadata(
                stub.ModelMetadata(codec.encode_model_metadata_request(args.model, args.model_version),
                                   timeout=args.timeout_s, metadata=args.metadata)
            )
            names = _names(args, [t.name for t in md.inputs])
            tensors = tuple(
                Tensor.from_numpy(name, arr, _datatype(arr, path)) for name, arr, path in zip(names, arrays, args.input, strict=True)
            )
            request = InferRequest(
                model_name=args.model,
                model_version=args.model_version,
                id=args.id,
                inputs=tensors,
                outputs=tuple(RequestedOutput(n) for n in args.output_name),
            )
            response = codec.decode_infer_response(stub.ModelInfer(codec.encode_infer_request(request),
                                                                   timeout=args.timeout_s, metadata=args.metadata))
        except grpc.RpcError as exc:
            raise UsageError(rpc_error_line(exc.code().name, exc.details(), args.tls)) from None
    return (response.model_version, [_Output(t.name, t.datatype, t.data) for t in response.outputs],
            dict(response.parameters))


def _client(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        return "pyserve"
    return "tritonclient"


def run(args: argparse.Namespace) -> int:
    args.metadata = auth_metadata(args.auth_token_file)
    args.tls = tls_files(args)
    arrays = _load_inputs(args.input)
    client = _client(args.client)
    if client == "tritonclient":
        try:
            import tritonclient.grpc  # noqa: F401
        except ImportError:
            raise UsageError("--client tritonclient: tritonclient[grpc] is not installed") from None
        version, outputs, params = _infer_tritonclient(args, arrays)
    else:
        version, outputs, params = _infer_pyserve(args, arrays)
    print(f"model {args.model} version {version}")
    if params:  # e.g. a traffic route's pyserve_variant and pyserve_request_id (for `pyserve traffic feedback`)
        print("parameters: " + " ".join(f"{k}={v}" for k, v in sorted(params.items())))
    for out in outputs:
        data = out.data
        print(f"output {out.name}: {out.datatype} {list(data.shape)}")
        print(np.array2string(data, threshold=200, edgeitems=4, max_line_width=120))
        if data.ndim == 2 and data.dtype.kind == "f" and data.shape[1] > 0:
            print(f"argmax per row: {np.argmax(data, axis=1).tolist()}")
    if args.output:
        if not outputs:
            raise UsageError("--output: the response has no outputs")
        np.save(args.output, outputs[0].data, allow_pickle=outputs[0].data.dtype == object)
        print(f"saved output {outputs[0].name} to {args.output}")
    return 0
