#!/usr/bin/env python
"""Generate pyserve's gRPC stubs from protos/ into pyserve/protocol/_generated/.

    python tools/gen_protos.py            # regenerate the committed stubs
    python tools/gen_protos.py --check    # exit 1 if the committed stubs do not match protos/

Needs grpcio-tools (the ``test`` extra). protoc's Python output is post-processed in three ways
(docs/protocol.md says why):

1. **Private descriptor pool.** The stubs register their files in one ``DescriptorPool()`` of
   their own (``_generated/_pool.py``, shared because grpc_service.proto imports
   model_config.proto), not in protobuf's default pool. tritonclient registers the same ``inference.*`` symbols
   (file ``grpc_service.proto``) in the default pool, and a process that imports both (our tests,
   any user's client code next to our server) would otherwise fail with "duplicate file name" /
   "duplicate symbol". Messages from either set are wire-compatible; only the Python classes differ.
2. **Runtime version floors.** protoc stamps the protobuf version it came from (e.g. 6.33.5) into
   ``ValidateProtobufRuntimeVersion``, and grpc's plugin stamps its own version into the
   ``_pb2_grpc`` module; both refuse to import under an older runtime. The stamps are lowered to
   the floors pyproject.toml declares (protobuf 6.31.0, grpcio 1.66.0); the code protoc emits uses
   only builder APIs that exist in those versions.
3. **Package-relative imports** of the ``_pb2`` module from the ``_pb2_grpc`` module, and of
   ``model_config_pb2`` from ``grpc_service_pb2`` (and its ``.pyi``).

``--check`` compiles protos/ to a ``FileDescriptorProto`` and compares it with the one embedded in
the committed stubs, so protoc version comment lines never make it fail.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "pyserve" / "protocol" / "_generated"
PACKAGE = "pyserve.protocol._generated"
# Dependencies first: grpc_service.proto imports model_config.proto.
PROTOS = ("model_config.proto", "grpc_service.proto", "traffic.proto")
#: Files that declare a service (the others get no ``_pb2_grpc`` module).
SERVICES = ("grpc_service.proto", "traffic.proto")

PROTOBUF_FLOOR = (6, 31, 0)
GRPC_FLOOR = "1.66.0"

POOL_MODULE = (
    '"""The private descriptor pool every pyserve stub registers its file in (see tools/gen_protos.py)."""\n\n'
    "from google.protobuf import descriptor_pool as _descriptor_pool\n\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
)

HEADER = (
    "# Post-processed by tools/gen_protos.py: private descriptor pool, runtime version floor "
    "{floor}.\n# Regenerate with `python tools/gen_protos.py`; do not edit by hand.\n"
)


def _protoc(args: list[str]) -> None:
    import importlib.resources

    from grpc_tools import protoc  # the test extra; imported here so --help works without it

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    argv = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", *args]
    rc = protoc.main(argv)
    if rc != 0:
        raise SystemExit(f"protoc failed ({rc}): {' '.join(argv)}")


def _sub_once(pattern: str, repl: str, text: str, what: str) -> str:
    new, n = re.subn(pattern, repl, text, count=1, flags=re.S)
    if n != 1:
        raise SystemExit(f"gen_protos: could not find {what} in protoc's output; update tools/gen_protos.py")
    return new


def _postprocess_pb2(text: str, module: str) -> str:
    text = _sub_once(
        r"_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,",
        "_runtime_version.Domain.PUBLIC,\n    {},\n    {},\n    {},".format(*PROTOBUF_FLOOR),
        text,
        "ValidateProtobufRuntimeVersion",
    )
    text = _sub_once(
        r"\n_sym_db = _symbol_database\.Default\(\)\n",
        "\n_sym_db = _symbol_database.Default()\n"
        "# Private pool (shared by pyserve's stubs): tritonclient registers the same inference.* symbols\n"
        "# in the default pool.\n"
        f"from {PACKAGE}._pool import POOL\n",
        text,
        "the symbol database line",
    )
    text = _sub_once(
        r"DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\(",
        "DESCRIPTOR = POOL.AddSerializedFile(",
        text,
        "AddSerializedFile on the default pool",
    )
    text = _sub_once(
        r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '[\w.]+', _globals\)",
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{PACKAGE}.{module}', _globals)",
        text,
        "BuildTopDescriptorsAndMessages",
    )
    # imports of sibling stubs (e.g. model_config_pb2 from grpc_service_pb2) become package-relative
    text = re.sub(r"\nimport (\w+_pb2) as (\w+)\n", rf"\nfrom {PACKAGE} import \1 as \2\n", text)
    if "Default()" in text.replace("_symbol_database.Default()", ""):
        raise SystemExit("gen_protos: protoc output still uses a default pool; update tools/gen_protos.py")
    return HEADER.format(floor="protobuf " + ".".join(map(str, PROTOBUF_FLOOR))) + text


def _postprocess_grpc(text: str, module: str) -> str:
    text = _sub_once(
        rf"\nimport {module} as (\w+)\n",
        rf"\nfrom {PACKAGE} import {module} as \1\n",
        text,
        f"import {module}",
    )
    text = _sub_once(
        r"GRPC_GENERATED_VERSION = '[\d.]+'",
        f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'",
        text,
        "GRPC_GENERATED_VERSION",
    )
    return HEADER.format(floor=f"grpcio {GRPC_FLOOR}") + text


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc on every file in PROTOS and write the post-processed stubs to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        _protoc([f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS])
        for proto in PROTOS:
            module = Path(proto).stem + "_pb2"
            outputs = [(f"{module}.py", _postprocess_pb2((Path(tmp) / f"{module}.py").read_text(), module))]
            if proto in SERVICES:
                grpc_ = _postprocess_grpc((Path(tmp) / f"{module}_grpc.py").read_text(), module)
                outputs.append((f"{module}_grpc.py", grpc_))
            pyi = (Path(tmp) / f"{module}.pyi").read_text()
            pyi = re.sub(r"\nimport (\w+_pb2) as (\w+)\n", rf"\nfrom {PACKAGE} import \1 as \2\n", pyi)
            outputs.append((f"{module}.pyi", pyi))
            for name, text in outputs:
                (out_dir / name).write_text(text)
                written.append(out_dir / name)
    pool = out_dir / "_pool.py"
    pool.write_text(POOL_MODULE)
    written.append(pool)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf/gRPC stubs; only pyserve.protocol.codec and the servicer import them."""\n')
    return written


def compiled_descriptors() -> dict[str, bytes]:
    """``{proto file name: serialized FileDescriptorProto}`` compiled now from protos/ by protoc."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        _protoc([f"--descriptor_set_out={out}", *PROTOS])
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    for f in fds.file:  # protoc's Python generator embeds descriptors without json_name
        _strip_json_names(f.message_type)
    return {f.name: f.SerializeToString(deterministic=True) for f in fds.file}


def _strip_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


def committed_descriptors() -> dict[str, bytes]:
    """The same, read from the committed stubs (imported from ``OUT_DIR``'s package)."""
    import importlib

    from google.protobuf import descriptor_pb2

    result = {}
    for proto in PROTOS:
        mod = importlib.import_module(f"{PACKAGE}.{Path(proto).stem}_pb2")
        fdp = descriptor_pb2.FileDescriptorProto.FromString(mod.DESCRIPTOR.serialized_pb)
        result[fdp.name] = fdp.SerializeToString(deterministic=True)
    return result


def check() -> list[str]:
    """Names of proto files whose committed stubs do not match protos/ (empty when all match)."""
    compiled, committed = compiled_descriptors(), committed_descriptors()
    return sorted(name for name in set(compiled) | set(committed) if compiled.get(name) != committed.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the committed stubs with protos/")
    args = parser.parse_args(argv)
    if args.check:
        sys.path.insert(0, str(ROOT))
        stale = check()
        if stale:
            print(f"stale stubs for {', '.join(stale)}: run python tools/gen_protos.py", file=sys.stderr)
            return 1
        print("stubs match protos/")
        return 0
    for path in generate():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
