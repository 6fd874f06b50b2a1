#!/bin/sh
# The benchmark's own virtual environments (../shared/ENVIRONMENT.md):
#  .venv-pa      perf_analyzer: the real binary ships in tritonclient[grpc]==2.51.0 (the newest whose
#                binary runs on glibc 2.36); it pins protobuf<5 and numpy<2, hence its own venv; it needs
#                libb64 (apt-get install libb64-0d) and libcudart from nvidia-cuda-runtime-cu12 on
#                LD_LIBRARY_PATH (bench_server.py sets it).
#  .venv-kserve  the KServe Python server (the peer), with the same torch as pyserve.
set -e
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
dpkg -s libb64-0d >/dev/null 2>&1 || { echo "setup.sh: apt-get install libb64-0d first" >&2; exit 2; }
test -x .venv-pa/bin/python || $PY -m venv .venv-pa
.venv-pa/bin/pip install -q "tritonclient[grpc]==2.51.0" nvidia-cuda-runtime-cu12
test -x .venv-kserve/bin/python || $PY -m venv .venv-kserve
.venv-kserve/bin/pip install -q torch==2.13.0
.venv-kserve/bin/pip install -q kserve
