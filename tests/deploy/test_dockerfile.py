"""deploy/Dockerfile and deploy/models.Dockerfile: hadolint-clean; the stages, build arguments and
pins the issue asks for; the image's ENTRYPOINT + CMD and every overlay's Deployment arguments go
through the real ``pyserve serve`` parser and its range checks; the HEALTHCHECK command and the
Kubernetes probes' health service names work against a running ``pyserve serve``; and the build
context left by /.dockerignore holds everything the build copies and nothing it should not.

No Docker engine runs here, so the image itself is not built (docs/deploy.md says how)."""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import pyserve.cli.serve as serve_cli
from deploy_helpers import (
    DOCKERFILE,
    MODELS_DOCKERFILE,
    OVERLAY_ID,
    OVERLAYS,
    ROOT,
    container,
    one,
    read_dockerfile,
    render_overlay,
    run_tool,
)
from pyserve.cli.main import build_parser, main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

STAGES = ["builder-cuda", "builder-cpu", "builder", "runtime-cuda", "runtime-cpu", "runtime"]
READY = re.compile(r"^pyserve: serving (\d+) model\(s\) on (\S+):(\d+)$")
needs_traffic = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("pyserve.traffic") is None,
    reason="pyserve.traffic is not on this branch (--traffic-config comes with the traffic controller)",
)


def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- lint ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [DOCKERFILE, MODELS_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_clean(path):
    out = run_tool("hadolint", "--no-color", str(path))
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_every_hadolint_ignore_is_explained():
    """Inline ignores are few, and each sits under a comment that gives its reason."""
    lines = DOCKERFILE.read_text().splitlines()
    ignored = []
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rule = line.split("=", 1)[1]
            ignored.append(rule)
            assert f"({rule})" in lines[i - 1] or f"({rule})" in lines[i - 2], f"line {i + 1}: {rule} unexplained"
    assert sorted(set(ignored)) == ["DL3006", "DL3008"]


# ---- structure ----------------------------------------------------------------------------------

def test_stages_and_the_variant_argument(dockerfile):
    assert list(dockerfile.stages) == STAGES
    assert dockerfile.final_stage == "runtime"
    glob = dockerfile.args(None)
    assert glob["VARIANT"] == "cuda"
    assert dockerfile.stages["builder"] == "builder-${VARIANT}"
    assert dockerfile.stages["runtime"] == "runtime-${VARIANT}"
    # the CPU-only base is python:3.11-slim, for its builder too (same Python for the wheel)
    assert glob["PYTHON_IMAGE"] == "python:3.11-slim"
    assert dockerfile.stages["builder-cpu"] == dockerfile.stages["runtime-cpu"] == "${PYTHON_IMAGE}"
    # GPU: a CUDA devel image builds, the CUDA + TensorRT image runs
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu\d\d\.\d\d", glob["CUDA_DEVEL_IMAGE"])
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", glob["TENSORRT_IMAGE"])
    assert dockerfile.stages["builder-cuda"] == "${CUDA_DEVEL_IMAGE}"
    assert dockerfile.stages["runtime-cuda"] == "${TENSORRT_IMAGE}"


def test_builder_compiles_the_extension_with_cuda_for_sm_75_80_90(dockerfile):
    cuda, cpu = dockerfile.env("builder-cuda"), dockerfile.env("builder-cpu")
    assert cuda["PYSERVE_CUDA"] == "ON" and cpu["PYSERVE_CUDA"] == "OFF"
    assert "-DCMAKE_CUDA_ARCHITECTURES=75;80;90" in cuda["CMAKE_ARGS"].split()
    # ... which the build reads: pyproject passes the environment's PYSERVE_CUDA to CMake, where ON
    # fails without nvcc, and CMAKE_ARGS reaches CMake through scikit-build-core
    define = pyproject()["tool"]["scikit-build"]["cmake"]["define"]["PYSERVE_CUDA"]
    assert define["env"] == "PYSERVE_CUDA"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert 'PYSERVE_CUDA=ON but no CUDA compiler' in cmake
    (run,) = dockerfile.of_stage("builder", "RUN")
    assert "pip wheel --no-deps --wheel-dir /wheels ." in run.args


def test_runtime_pins_torch_and_installs_the_wheel(dockerfile):
    assert dockerfile.args("runtime")["TORCH_VERSION"] == "2.13.0"
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()  # the same pin as `make base`
    runs = [r.args for r in dockerfile.of_stage("runtime", "RUN")]
    assert any('"torch==${TORCH_VERSION}"' in r and '--index-url "${TORCH_INDEX_URL}"' in r for r in runs)
    assert dockerfile.env("runtime-cpu")["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert any("--mount=type=bind,from=builder,source=/wheels" in r and "pip install /wheels/pyserve-" in r for r in runs)
    # torch is installed before the wheel, so the wheel's requirements never replace it
    order = [i for i, r in enumerate(runs) if "torch==" in r or "/wheels/pyserve-" in r]
    assert "torch==" in runs[order[0]]


def test_runtime_is_non_root_exposes_8001_8002_and_reads_models(dockerfile):
    uid = dockerfile.args("runtime")["PYSERVE_UID"]
    assert uid.isdigit() and int(uid) != 0
    (user,) = dockerfile.of_stage("runtime", "USER")
    assert user.args == "${PYSERVE_UID}:${PYSERVE_UID}"  # numeric: Kubernetes' runAsNonRoot can check it
    (expose,) = dockerfile.of_stage("runtime", "EXPOSE")
    assert expose.args.split() == ["8001", "8002"]
    assert any("mkdir -p /models" in r.args for r in dockerfile.of_stage("runtime", "RUN"))
    cmd = dockerfile.exec_form("runtime", "CMD")
    assert cmd[cmd.index("--model-repository") + 1] == "/models"
    assert dockerfile.env("runtime")["PYSERVE_GRPC_PORT"] == cmd[cmd.index("--grpc-port") + 1] == "8001"
    assert cmd[cmd.index("--metrics-port") + 1] == "8002"


def test_models_image_layout():
    models = read_dockerfile(MODELS_DOCKERFILE)
    (image,) = models.stages.values()
    assert re.fullmatch(r"busybox:\d+\.\d+", image)  # sh and cp for the initContainer
    assert [i.args for i in models.instructions if i.keyword == "COPY"] == [". /models/"]
    assert [i.args for i in models.instructions if i.keyword == "USER"] == ["10001:10001"]


# ---- arguments through the real `pyserve serve` parser ------------------------------------------

def parse(argv: list[str], capsys):
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"pyserve refused {argv}: {capsys.readouterr().err}")


def run_checks(argv: list[str], monkeypatch) -> tuple[int, object]:
    """``pyserve.cli.main.main(argv)`` with serving replaced, so run()'s range checks are applied."""
    seen = {}

    async def fake_serve(args):
        seen["args"] = args
        return 0

    monkeypatch.setattr(serve_cli, "_serve", fake_serve)
    code = main(argv)
    return code, seen.get("args")


def local_paths(argv: list[str], tmp_path: Path, traffic_text: str | None = None) -> list[str]:
    """Point /models and the traffic file of the container at local stand-ins (same flags)."""
    repo = tmp_path / "models"
    repo.mkdir(exist_ok=True)
    traffic = tmp_path / "traffic.yaml"
    if traffic_text is not None:
        traffic.write_text(traffic_text)
    swap = {"/models": str(repo), "/etc/pyserve/traffic/traffic.yaml": str(traffic)}
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(f"{key}={swap.get(value, value)}" if eq else swap.get(arg, arg))
    return out


def test_image_entrypoint_and_cmd_are_accepted_by_pyserve_serve(dockerfile, capsys, monkeypatch, tmp_path):
    entrypoint = dockerfile.exec_form("runtime", "ENTRYPOINT")
    cmd = dockerfile.exec_form("runtime", "CMD")
    assert entrypoint == ["pyserve", "serve"]
    assert pyproject()["project"]["scripts"]["pyserve"] == "pyserve.cli.main:main"
    args = parse(entrypoint[1:] + cmd, capsys)
    assert args.func is serve_cli.run
    assert (args.model_repository, args.grpc_port, args.metrics_port) == ("/models", 8001, 8002)
    code, served = run_checks(local_paths(entrypoint[1:] + cmd, tmp_path), monkeypatch)
    assert code == 0 and served is not None, capsys.readouterr().err


def deployment_argv(dockerfile, overlay: str) -> list[str]:
    c = container(one(render_overlay(overlay), "Deployment", "pyserve"))
    assert "command" not in c  # the image's ENTRYPOINT runs; args take the place of its CMD
    return dockerfile.exec_form("runtime", "ENTRYPOINT")[1:] + c["args"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_deployment_args_without_traffic_flags_are_accepted(dockerfile, overlay, capsys, monkeypatch, tmp_path):
    """Every argument but the traffic controller's two, which the next test covers once merged."""
    argv = [a for a in deployment_argv(dockerfile, overlay) if not a.startswith("--traffic-")]
    assert len(argv) == len(deployment_argv(dockerfile, overlay)) - 2
    args = parse(argv, capsys)
    assert (args.model_repository, args.grpc_port, args.metrics_port, args.exit_timeout_s) == ("/models", 8001, 8002, 30.0)
    code, served = run_checks(local_paths(argv, tmp_path), monkeypatch)
    assert code == 0 and served is not None, capsys.readouterr().err


@needs_traffic
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_ID)
def test_deployment_args_are_accepted(dockerfile, overlay, capsys, monkeypatch, tmp_path):
    argv = deployment_argv(dockerfile, overlay)
    args = parse(argv, capsys)
    assert args.traffic_config == "/etc/pyserve/traffic/traffic.yaml"
    assert args.traffic_poll_s == 5
    (text,) = one(render_overlay(overlay), "ConfigMap", "pyserve-traffic")["data"].values()
    code, served = run_checks(local_paths(argv, tmp_path, traffic_text=text), monkeypatch)
    assert code == 0 and served is not None, capsys.readouterr().err


# ---- health: the HEALTHCHECK command and the probes' service names ------------------------------

def healthcheck_argv(dockerfile) -> list[str]:
    (hc,) = dockerfile.of_stage("runtime", "HEALTHCHECK")
    options, _, cmd = hc.args.partition(" CMD ")
    assert "--start-period=" in options
    argv = json.loads(cmd)
    assert argv[:2] == ["python3", "-c"] and len(argv) == 3
    return [sys.executable, *argv[1:]]  # python3 of the image = this interpreter here


def run_healthcheck(dockerfile, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYSERVE_GRPC_PORT": str(port)}
    return subprocess.run(healthcheck_argv(dockerfile), env=env, capture_output=True, text=True, timeout=60)


@contextmanager
def health_server(status):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.set("", status)
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_fails_unless_serving(dockerfile):
    with health_server(health_pb2.HealthCheckResponse.SERVING) as port:
        assert run_healthcheck(dockerfile, port).returncode == 0
    with health_server(health_pb2.HealthCheckResponse.NOT_SERVING) as port:
        assert run_healthcheck(dockerfile, port).returncode == 1
    out = run_healthcheck(dockerfile, free_port())  # nothing listening
    assert out.returncode == 1 and "grpc" in out.stderr.lower()


@pytest.fixture(scope="module")
def pyserve_serve(tmp_path_factory):
    """A real `pyserve serve` (empty repository) on a free port of 127.0.0.1."""
    repo = tmp_path_factory.mktemp("repo")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyserve.cli.main", "serve", "--model-repository", str(repo), "--grpc-port", "0",
         "--host", "127.0.0.1", "--exit-timeout-s", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=90)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"pyserve serve printed no ready line; stderr:\n{proc.stderr.read()}")
    match = READY.match(line.strip())
    assert match, line
    yield int(match.group(3))
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_healthcheck_passes_on_a_running_server(dockerfile, pyserve_serve):
    out = run_healthcheck(dockerfile, pyserve_serve)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_kubernetes_grpc_probes_get_serving(pyserve_serve, probe):
    """What the kubelet's grpc probe sends (grpc.health.v1 Check with the probe's service name)."""
    for overlay in OVERLAYS:
        spec = container(one(render_overlay(overlay), "Deployment", "pyserve"))[probe]["grpc"]
        with grpc.insecure_channel(f"127.0.0.1:{pyserve_serve}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=spec.get("service", "")), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, (overlay, spec)


# ---- build context ------------------------------------------------------------------------------

def context_files() -> set[str]:
    """Files of the build context, by docker-py's implementation of .dockerignore matching."""
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    kept = exclude_paths(str(ROOT), patterns, dockerfile="deploy/Dockerfile")
    return {p for p in kept if (ROOT / p).is_file()}


def test_build_context_has_what_the_build_copies(dockerfile):
    files = context_files()
    for ins in dockerfile.instructions:
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            for source in ins.args.split()[:-1]:
                source = source.rstrip("/")
                assert source in files or any(f.startswith(source + "/") for f in files), source
    # every C++/CUDA source CMake compiles, every Python module, the package readme
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for source in re.findall(r"^\s+(csrc/\S+\.(?:cpp|cu))$", cmake, re.M):
        assert source in files, source
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "pyserve").rglob("*.py")}
    assert package <= files
    assert pyproject()["project"]["readme"] in files


def test_build_context_leaves_out_local_state():
    files = context_files()
    assert not [f for f in files if f.split("/")[0] in {".venv", "build", ".git", "tests", "examples", "out", "benchmarks"}]
    assert not [f for f in files if f.endswith((".so", ".pyc")) or "__pycache__" in f]
    assert {f.split("/")[0] for f in files} <= {"pyproject.toml", "CMakeLists.txt", "README.md", "csrc", "pyserve",
                                                 ".dockerignore", "deploy"}
    assert [f for f in files if f.startswith("deploy/")] == ["deploy/Dockerfile"]


# ---- the build, without Docker ------------------------------------------------------------------

def build_check_code(dockerfile) -> str:
    """The python -c program the runtime stage runs after installing the wheel."""
    (run,) = [r for r in dockerfile.of_stage("runtime", "RUN") if "/wheels/pyserve-" in r.args]
    match = re.search(r'python3 -c "(import os, sys, pyserve\._C[^"]*)"', run.args)
    assert match, run.args
    return match.group(1)


def test_build_check_tells_cuda_from_cpu_builds(dockerfile):
    """The image build's check passes for the variant this _C was built as and fails otherwise."""
    import pyserve._C as c

    built = "ON" if c.build_info()["cuda"] else "OFF"
    other = "OFF" if built == "ON" else "ON"
    code = build_check_code(dockerfile)
    ok = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYSERVE_CUDA": built},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 or (built == "ON" and c.build_info()["cuda_archs"] != [75, 80, 90]), ok.stderr
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYSERVE_CUDA": other},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and f"not built as PYSERVE_CUDA={other}" in bad.stderr


@pytest.mark.slow
def test_cpu_builder_makes_a_working_wheel_from_the_build_context(dockerfile, tmp_path):
    """The CPU variant's builder and install steps on the .dockerignore'd context (a few minutes:
    it compiles pyserve._C). Build isolation is off to stay offline; the builder has it on."""
    context = tmp_path / "context"
    for rel in context_files():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        (context / rel).write_bytes((ROOT / rel).read_bytes())
    env = {**os.environ, **dockerfile.env("builder-cpu")}
    env.pop("CMAKE_ARGS", None)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(wheels), "."], cwd=context, env=env, capture_output=True,
                           text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("pyserve-*.whl")
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    # -S: no site-packages, so the editable pyserve of this venv (a meta-path finder) stays out
    check_env = {**os.environ, "PYSERVE_CUDA": "OFF", "PYTHONPATH": str(target)}
    check = subprocess.run([sys.executable, "-S", "-c", build_check_code(dockerfile)], env=check_env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "'cuda': False" in check.stdout
    where = subprocess.run([sys.executable, "-S", "-c", "import pyserve._C as c; print(c.__file__)"], env=check_env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr  # the wheel's, not ours
