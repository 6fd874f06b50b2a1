"""Progress bars of `pyserve compress`: on a terminal, per stage and per epoch; off with -q and off a terminal."""

import os
import sys

import pytest

pty = pytest.importorskip("pty")


def run_in_pty(argv, cols=120):
    """Run ``argv`` with stdout/stderr on a pseudo-terminal of ``cols`` columns; returns (rc, output)."""
    import fcntl
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # child
        fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
        os.execv(sys.executable, [sys.executable, *argv])
    out = bytearray()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not data:
            break
        out.extend(data)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_bars_on_a_terminal_and_quiet(compressed, tmp_path):
    recipe, out_fixture, _ = compressed  # its checkpoint is cached: no training from scratch
    rc, out = run_in_pty(["-m", "pyserve", "compress", str(recipe), "-o", str(tmp_path / "a.pyserve")])
    assert rc == 0, out
    assert "stage prune:" in out and "stage quantize:" in out and "stage huffman:" in out
    assert "%|" in out and "it/s" in out
    assert "prune round 1/1 retrain epoch 1/1:" in out and "centroid fine-tuning epoch 1/1:" in out
    # bars change nothing about the result: same bytes as the fixture's run (stderr captured, -q)
    assert (tmp_path / "a.pyserve").read_bytes() == out_fixture.read_bytes()


def test_quiet_on_a_terminal_shows_no_bar():
    code = ("from pyserve.compress._train import progress\n"
            "assert list(progress(range(3), desc='quiet', verbose=False)) == [0, 1, 2]\n"
            "assert list(progress(range(3), desc='shown', verbose=True)) == [0, 1, 2]\n")
    rc, out = run_in_pty(["-c", code])
    assert rc == 0, out
    assert "quiet" not in out and "shown: 100%|" in out


def test_helper_disabled_off_a_terminal(capsys):
    from pyserve.compress._train import progress

    assert list(progress(range(3), desc="x", verbose=True)) == [0, 1, 2]
    assert "%|" not in capsys.readouterr().err  # pytest's captured stderr is not a terminal
