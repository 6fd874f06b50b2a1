"""The Huffman decoder's two builds (BMI2 and portable) and its long-code path, against the slow
bit-at-a-time reference decoder and the encoder's input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pyserve.ops import HUFFMAN_TABLE_BITS, huffman_decode, huffman_encode
from pyserve.ops import reference as ref


def _long_code_symbols(n: int, seed: int, dtype=np.uint8) -> np.ndarray:
    """Symbols whose codes take every length from 1 to 20 bits (counts halve from one symbol to
    the next, the last few equal), shuffled so that long codes fall in every lane at every phase."""
    m = 20
    counts = np.maximum(n >> np.arange(1, m + 1), 1)
    counts[-1] = counts[-2]
    x = np.repeat(np.arange(m, dtype=np.int64) * (1 if dtype == np.uint8 else 3000), counts)
    return np.random.default_rng(seed).permutation(x).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["uint8", "uint16"])
def test_every_code_length_round_trips(dtype):
    x = _long_code_symbols(1 << 20, seed=1, dtype=dtype)
    stream = huffman_encode(x)
    lengths = ref.parse_huffman_stream(stream).lengths
    present = sorted(set(int(v) for v in lengths[lengths > 0]))
    assert present[0] == 1 and present[-1] >= HUFFMAN_TABLE_BITS + 5  # short, table-sized and long codes
    np.testing.assert_array_equal(huffman_decode(stream), x)


def test_lanes_stall_on_long_codes_together():
    # a third of the symbols have codes longer than the primary table, so most 4-lane groups have
    # several lanes stalled at once, at different lookups of the group
    rng = np.random.default_rng(5)
    counts = np.concatenate([[300_000, 200_000, 100_000], np.full(4000, 60)])
    x = rng.permutation(np.repeat(np.arange(counts.size, dtype=np.uint16), counts))
    stream = huffman_encode(x)
    parsed = ref.parse_huffman_stream(stream)
    assert parsed.num_streams == 4
    long_share = counts[parsed.lengths[: counts.size] > HUFFMAN_TABLE_BITS].sum() / counts.sum()
    assert 0.2 < long_share < 0.5
    np.testing.assert_array_equal(huffman_decode(stream), x)
    # the independent reference decoder agrees on a prefix-sized stream of the same code shape
    small = huffman_encode(x[:20_000])
    np.testing.assert_array_equal(ref.huffman_decode_reference(small), x[:20_000])


def test_portable_build_matches():
    # the portable (non-BMI2) loop runs where the environment variable asks for it: same symbols,
    # same errors, in a fresh interpreter (the choice is made per call in C++)
    script = textwrap.dedent(
        """
        import numpy as np
        from pyserve.ops import huffman_decode, huffman_encode
        rng = np.random.default_rng(3)
        streams = [
            (np.clip(np.round(rng.laplace(0, 2.5, 300_001)), -16, 15) + 16).astype(np.uint8),
            np.minimum(rng.geometric(0.1, 200_000), 255).astype(np.uint8),
            rng.integers(0, 65536, 100_000).astype(np.uint16),
        ]
        counts = np.maximum((1 << 20) >> np.arange(1, 21), 1)
        streams.append(rng.permutation(np.repeat(np.arange(20, dtype=np.uint8), counts)))
        for x in streams:
            s = huffman_encode(x)
            assert np.array_equal(huffman_decode(s), x)
            bad = bytearray(s)
            bad[-1] ^= 0x10
            try:
                huffman_decode(bytes(bad))
                print("accepted")
            except ValueError as exc:
                print("rejected", str(exc)[:60])
        print("ok")
        """
    )
    env_portable = dict(os.environ, PYSERVE_HUFFMAN_NO_BMI2="1")
    env_default = {k: v for k, v in os.environ.items() if k != "PYSERVE_HUFFMAN_NO_BMI2"}
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
            for env in (env_portable, env_default)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().endswith("ok")
    assert runs[0].stdout == runs[1].stdout  # same verdict and message for every corrupted stream


def test_long_code_past_the_last_code_is_rejected():
    # one present symbol: its code is "0" (1 bit) and every pattern starting with 1 is no code; in a
    # multi-stream stream those patterns reach the lock-step loop's long-code path
    x = np.zeros(100_000, dtype=np.uint8)
    stream = bytearray(huffman_encode(x))
    parsed = ref.parse_huffman_stream(bytes(stream))
    assert parsed.num_streams == 4
    first_payload = len(stream) - sum(len(b) for b in parsed.bitstreams)
    for lane in range(4):
        bad = bytearray(stream)
        offset = first_payload + sum(len(b) for b in parsed.bitstreams[:lane]) + 100
        bad[offset] = 0x80
        with pytest.raises(ValueError, match="no code"):
            huffman_decode(bytes(bad))
