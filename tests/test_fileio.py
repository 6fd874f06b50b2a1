"""pyserve._fileio.atomic_output: all-or-nothing writes with the usual file mode."""

import os
import stat

import pytest

from pyserve._fileio import atomic_output


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_file_has_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        target = tmp_path / "a" / "model.pyserve"
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"abc")
        plain = tmp_path / "plain"
        plain.write_bytes(b"x")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pyserve"]


def test_failed_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_reading_the_umask_leaves_it_unchanged():
    from pyserve import _fileio

    old = os.umask(0o027)
    try:
        assert _fileio._umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what was set
    finally:
        os.umask(old)
