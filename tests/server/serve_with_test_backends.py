"""``python serve_with_test_backends.py ARGS...`` = ``pyserve serve ARGS...`` with the torch-free
``test-echo`` backend of conftest.py registered: the shutdown tests run the real CLI (its signal
handling) as a subprocess, on models whose latency they choose."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: conftest imports engine_fixtures

from conftest import EchoBackend  # noqa: E402

from pyserve.backends import register_backend  # noqa: E402
from pyserve.cli.main import main  # noqa: E402

if __name__ == "__main__":
    register_backend("test-echo", EchoBackend, "model.test")
    sys.exit(main(["serve", *sys.argv[1:]]))
