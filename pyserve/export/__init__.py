"""``pyserve export``: a model or artifact as a deployable file — ONNX (fp32, fp16, int8 Q/DQ),
torch.export ``.pt2`` (TorchScript ``.pt`` where torch.export cannot capture the model), or a
TensorRT engine — optionally written straight into a model repository with a config the server
loads.

Use :func:`check_request` (cheap: no model is loaded) then :func:`run_export`. Every argument
problem, an opset too old for the precision, int8 asked for a source without int8 weights and an
unwritable destination raise :class:`ExportError` from :func:`check_request`, before any work; the
output is written to a temporary file and renamed, so a failed export leaves no partial file.
Formats in detail: docs/export.md.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyserve.backends.base import ModelSignature
from pyserve.export._repository import FORMAT_FILES, atomic_output, check_writable_dir, model_config_text
from pyserve.export._source import ExportError, Source, example_inputs, identify, load_source

__all__ = ["ExportError", "ExportRequest", "ExportResult", "FORMATS", "PRECISIONS", "Source", "check_request",
           "run_export", "load_source", "example_inputs"]

FORMATS = ("onnx", "torch", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
#: precisions each format can write
FORMAT_PRECISIONS = {"onnx": PRECISIONS, "torch": ("fp32",), "tensorrt": PRECISIONS}
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ExportRequest:
    """One export, as the CLI takes it.

    source : .pyserve artifact, torch.export .pt2 or recipe .yaml.
    to : ``onnx``, ``torch`` or ``tensorrt``.
    output : file to write (``-o``); or ``repository`` + ``model`` + ``version`` (the file then is
        ``repository/model/version/model.<ext>`` and ``repository/model/config.pbtxt`` is written).
    precision : ``fp32``, ``fp16`` or ``int8`` (torch: fp32 only).
    dynamic_batch : dimension 0 of batched inputs/outputs stays dynamic (``--dynamic-batch``); without it
        the batch is fixed to 1.
    opset : ONNX opset (None: :data:`pyserve.export.onnx.DEFAULT_OPSET`).
    max_batch_size : ``max_batch_size`` of the written config when the batch is dynamic.
    min_batch, opt_batch, workspace_bytes, timing_cache : TensorRT build settings (max batch =
        ``max_batch_size``).
    """

    source: Path
    to: str
    output: Path | None = None
    repository: Path | None = None
    model: str | None = None
    version: int = 1
    precision: str = "fp32"
    dynamic_batch: bool = False
    opset: int | None = None
    max_batch_size: int = 64
    min_batch: int = 1
    opt_batch: int = 8
    workspace_bytes: int = 1 << 30
    timing_cache: Path | None = None


@dataclass
class ExportResult:
    path: Path
    format: str                     # onnx, torch, torchscript, tensorrt
    precision: str
    signature: ModelSignature
    config_path: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _artifact_has_int8(path: Path) -> bool:
    from pyserve.artifact import ArtifactError, read_manifest

    try:
        manifest = read_manifest(path)
    except ArtifactError as exc:
        raise ExportError(str(exc)) from None
    return any(meta.get("encoding") == "int8" for meta in manifest.tensors.values())


def check_request(req: ExportRequest) -> str:
    """Check every argument without loading the model; returns the source kind.

    Raises ExportError (the message names the argument) for: an unknown format or precision, a
    precision the format cannot write, an opset out of range or too old for the precision, int8
    asked for a source without int8 weights, TensorRT asked where the library is missing, bad
    TensorRT batch sizes, output and repository both or neither given, a bad model name or
    version, an unwritable destination.
    """
    if req.to not in FORMATS:
        raise ExportError(f"--to must be one of {', '.join(FORMATS)}, got {req.to!r}")
    if req.precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {req.precision!r}")
    if req.precision not in FORMAT_PRECISIONS[req.to]:
        raise ExportError(f"--to {req.to} writes {', '.join(FORMAT_PRECISIONS[req.to])} only, got --precision "
                          f"{req.precision}; use --to onnx (or tensorrt) for {req.precision}")
    if req.opset is not None:
        from pyserve.export.onnx import MIN_OPSET

        if req.to == "torch":
            raise ExportError("--opset applies to --to onnx and --to tensorrt only")
        newest = _newest_opset()
        if isinstance(req.opset, bool) or not isinstance(req.opset, int) or req.opset > newest:
            raise ExportError(f"--opset must be an integer <= {newest} (the newest this onnx knows), got {req.opset!r}")
        if req.opset < MIN_OPSET[req.precision]:
            why = " (per-channel DequantizeLinear arrived in opset 13)" if req.precision == "int8" else ""
            raise ExportError(f"--opset {req.opset} is too old for --precision {req.precision}: it needs opset >= "
                              f"{MIN_OPSET[req.precision]}{why}")
    for name in ("max_batch_size", "min_batch", "opt_batch", "workspace_bytes", "version"):
        v = getattr(req, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ExportError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    kind = identify(req.source)
    if req.precision == "int8":
        if kind != "artifact" or not _artifact_has_int8(req.source):
            raise ExportError(
                f"--precision int8 needs int8 weight scales, and {str(req.source)!r} has none: run the `int8` "
                f"compression method (a recipe stage `{{method: int8}}`, with calibration for static activation "
                f"scales) or build the artifact with int8 encodings (pyserve.artifact.encode_int8), then export "
                f"that artifact")
    if req.to == "tensorrt":
        from pyserve.export.tensorrt import TensorRTOptions

        try:
            TensorRTOptions(req.min_batch, req.opt_batch, req.max_batch_size, req.workspace_bytes, req.timing_cache)
        except ValueError as exc:
            raise ExportError(f"TensorRT settings: {exc}") from None
        _require_tensorrt_builder()
    if (req.output is None) == (req.repository is None):
        raise ExportError("give exactly one of -o OUT and --repository DIR")
    if req.repository is not None:
        if not req.model or not _MODEL_NAME.match(req.model):
            raise ExportError(f"--model must be a model name (letters, digits, '_', '.', '-'), got {req.model!r}")
        try:
            check_writable_dir(req.repository, "--repository")
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        yaml_cfg = Path(req.repository) / req.model / "config.yaml"
        if yaml_cfg.exists():  # the server refuses a model with both config.yaml and config.pbtxt
            raise ExportError(f"{yaml_cfg} exists and --repository writes config.pbtxt beside it, which the server "
                              f"would refuse (one config per model): remove or rename it, or export with -o")
    else:
        if req.output.is_dir():
            raise ExportError(f"-o {str(req.output)!r} is a directory; give a file name")
        try:
            check_writable_dir(req.output.parent, "-o")
        except ValueError as exc:
            raise ExportError(str(exc)) from None
    return kind


def _newest_opset() -> int:
    try:
        import onnx.defs
    except ImportError:
        raise ExportError("ONNX export needs the `onnx` and `onnxruntime` packages: pip install 'pyserve[export]'") \
            from None
    return int(onnx.defs.onnx_opset_version())


def _require_tensorrt_builder() -> None:
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("--to tensorrt needs the full TensorRT library (a `tensorrt` module with a Builder), which "
                          "is not installed; export --to onnx here and build the engine where TensorRT is installed "
                          "(docs/export.md shows both ways)") from None
    if not hasattr(trt, "Builder"):
        raise ExportError("--to tensorrt: this `tensorrt` module has no Builder (a runtime-only install?)")


def _destination(req: ExportRequest, fmt: str) -> Path:
    if req.repository is not None:
        return Path(req.repository) / req.model / str(req.version) / FORMAT_FILES[fmt]
    return Path(req.output)


def run_export(req: ExportRequest, source: Source | None = None) -> ExportResult:
    """Do the export (call :func:`check_request` first; this calls it again, cheaply).

    ``source`` : an already loaded :func:`load_source` result (tests reuse one); loaded here if None.
    Raises ExportError for a source that cannot be loaded or exported.
    """
    t0 = time.perf_counter()
    check_request(req)
    if source is None:
        source = load_source(req.source)
    if req.precision == "int8" and not source.int8:
        raise ExportError(f"{req.source}: no int8 tensors in this source (run the `int8` method first)")
    sig = source.signature
    if not req.dynamic_batch:
        from pyserve.export.onnx import signature_with_batch

        sig = signature_with_batch(sig, False)
    batch = 2 if req.dynamic_batch else 1
    example = example_inputs(sig, batch=batch)
    if req.to == "onnx":
        result = _export_onnx(req, source, sig, example)
    elif req.to == "torch":
        result = _export_torch(req, source, sig, example)
    else:
        result = _export_tensorrt(req, source, sig, example)
    if req.repository is not None:
        cfg = Path(req.repository) / req.model / "config.pbtxt"
        mbs = (req.max_batch_size if req.dynamic_batch else 0)
        text = model_config_text(req.model, result.format, result.signature, max_batch_size=mbs)
        with atomic_output(cfg) as tmp:
            tmp.write_text(text, encoding="utf-8")
        result.config_path = cfg
    result.seconds = time.perf_counter() - t0
    return result


def _onnx_graph(req: ExportRequest, source: Source, sig: ModelSignature, example: tuple):
    from pyserve.export import onnx as onnx_export

    opset = req.opset or onnx_export.DEFAULT_OPSET
    try:
        model = onnx_export.export_onnx_model(source.module, example, sig, opset=opset,
                                              dynamic_batch=req.dynamic_batch)
        notes = []
        if req.precision == "fp16":
            model = onnx_export.to_fp16(model)
        elif req.precision == "int8":
            model, report = onnx_export.to_int8_qdq(model, source.int8, opset=opset)
            acts = sum("activation" in v for v in report.values())
            absent = sorted(k for k, v in report.items() if v == "not in the exported graph")
            notes.append(f"int8: {len(report) - len(absent)} weight(s) as INT8 + per-channel DequantizeLinear; "
                         f"{acts} with static activation Q/DQ, the rest weight-only (fp32 activations)")
            if absent:
                notes.append(f"int8: not in the exported graph (unused by its outputs, or folded by the exporter): "
                             f"{', '.join(absent)}")
        return onnx_export.finalize(model, sig), notes
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def _export_onnx(req, source, sig, example) -> ExportResult:
    from pyserve.export import onnx as onnx_export

    model, notes = _onnx_graph(req, source, sig, example)
    dest = _destination(req, "onnx")
    with atomic_output(dest) as tmp:
        onnx_export.write_model(model, tmp)
    return ExportResult(dest, "onnx", req.precision, sig, notes=notes)


def _export_torch(req, source, sig, example) -> ExportResult:
    from pyserve.export.torch_export import save_pt2, save_torchscript

    want_script = req.output is not None and Path(req.output).suffix == ".pt"
    notes = []
    if not want_script:
        dest = _destination(req, "torch")
        try:
            with atomic_output(dest) as tmp:
                save_pt2(source.module, example, sig, tmp, dynamic_batch=req.dynamic_batch)
            return ExportResult(dest, "torch", "fp32", sig)
        except Exception as exc:  # torch.export could not capture it: TorchScript instead
            notes.append(f"torch.export failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                         "wrote TorchScript instead")
    dest = _destination(req, "torchscript") if req.repository is not None else Path(req.output).with_suffix(".pt")
    try:
        with atomic_output(dest) as tmp:
            save_torchscript(source.module, example, sig, tmp)
    except Exception as exc:
        raise ExportError(f"neither torch.export nor TorchScript tracing can capture the model: "
                          f"{type(exc).__name__}: {exc}") from None
    return ExportResult(dest, "torchscript", "fp32", sig, notes=notes)


def _export_tensorrt(req, source, sig, example) -> ExportResult:
    import tempfile

    from pyserve.export import onnx as onnx_export
    from pyserve.export.tensorrt import TensorRTOptions, build_engine, profile_shapes

    opts = TensorRTOptions(req.min_batch if req.dynamic_batch else 1, req.opt_batch if req.dynamic_batch else 1,
                           req.max_batch_size if req.dynamic_batch else 1, req.workspace_bytes, req.timing_cache)
    try:
        profiles = profile_shapes(sig, opts, dynamic_batch=req.dynamic_batch)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    model, notes = _onnx_graph(req, source, sig, example)
    dest = _destination(req, "tensorrt")
    with tempfile.TemporaryDirectory() as d:
        onnx_path = Path(d) / "model.onnx"
        onnx_export.write_model(model, onnx_path)
        with atomic_output(dest) as tmp:
            try:
                build_engine(onnx_path, tmp, profiles, opts)
            except (ValueError, RuntimeError) as exc:
                raise ExportError(str(exc)) from None
    return ExportResult(dest, "tensorrt", req.precision, sig, notes=notes)
