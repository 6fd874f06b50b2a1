"""Huffman coding of quantized-weight index streams vs zstandard and zlib, one thread.

Streams (uint8, as Deep Compression stores them):
  kmeans32  k-means codebook indices of a pruned layer: a Laplacian over 32 centroids (scale 2.5)
  gaps90    relative index gaps of a 90%-sparse layer: geometric(p=0.1) gaps, capped at 255

For each codec: compressed size (and bits per symbol), encode and decode throughput in MB/s of
symbols (median of --repeats runs; a single run for calls slower than 1 s), and the ratios that matter for the DESIGN.md target
("Huffman decode at least as fast as zstd decompression of the same index stream, and no
larger"): peer size / pyserve size and pyserve decode speed / peer decode speed.

    python benchmarks/bench_huffman.py [--sizes 1000000,10000000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import zlib

import numpy as np

from pyserve.ops import build_info, huffman_decode, huffman_encode

try:
    import zstandard
except ImportError:  # pragma: no cover - optional peer
    zstandard = None


def kmeans32(n: int, rng: np.random.Generator) -> np.ndarray:
    return (np.clip(np.round(rng.laplace(0.0, 2.5, n)), -16, 15) + 16).astype(np.uint8)


def gaps90(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(rng.geometric(0.1, n), 255).astype(np.uint8)


STREAMS = {"kmeans32": kmeans32, "gaps90": gaps90}


def median_seconds(fn, repeats: int, slow_s: float = 1.0) -> float:
    t0 = time.perf_counter()
    fn()  # warm up (page faults, first-use allocations)
    first = time.perf_counter() - t0
    if first > slow_s:  # e.g. zstd -19 compression of 10 MB: one run says enough
        return first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def codecs():
    yield "pyserve huffman", huffman_encode, huffman_decode
    if zstandard is not None:
        for level in (3, 19):
            cctx = zstandard.ZstdCompressor(level=level, threads=0)
            dctx = zstandard.ZstdDecompressor()
            yield f"zstd -{level}", (lambda b, c=cctx: c.compress(b)), dctx.decompress
    for level in (6, 9):
        yield f"zlib -{level}", (lambda b, lv=level: zlib.compress(b, lv)), zlib.decompress


def run(sizes: list[int], repeats: int) -> None:
    info = build_info()
    print(f"pyserve {info['version']} ({info['compiler']}), numpy {np.__version__}, "
          f"zstandard {getattr(zstandard, '__version__', 'not installed')}, zlib {zlib.ZLIB_VERSION}, "
          f"cpus {os.cpu_count()}, one thread, median of {repeats}")
    for name, make in STREAMS.items():
        for n in sizes:
            x = make(n, np.random.default_rng(0))
            raw = x.tobytes()
            p = np.bincount(x, minlength=256) / n
            entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
            print(f"\n{name}: {n:,} uint8 symbols, entropy {entropy:.3f} bits/symbol "
                  f"(Shannon bound {entropy * n / 8:,.0f} bytes)")
            header = (f"{'codec':<16} {'bytes':>12} {'bits/sym':>9} {'enc MB/s':>9} {'dec MB/s':>9} "
                      f"{'size vs ours':>13} {'our dec speedup':>16}")
            print(header)
            print("-" * len(header))
            ours_size = ours_dec = None
            for codec, enc, dec in codecs():
                payload = x if codec.startswith("pyserve") else raw
                blob = enc(payload)
                out = dec(blob)
                assert np.array_equal(np.frombuffer(out, np.uint8) if isinstance(out, bytes) else out, x), codec
                t_enc = median_seconds(lambda: enc(payload), repeats)
                t_dec = median_seconds(lambda: dec(blob), repeats)
                if ours_size is None:
                    ours_size, ours_dec = len(blob), t_dec
                print(f"{codec:<16} {len(blob):>12,} {8 * len(blob) / n:>9.3f} {n / t_enc / 1e6:>9.0f} "
                      f"{n / t_dec / 1e6:>9.0f} {len(blob) / ours_size:>12.3f}x {t_dec / ours_dec:>15.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated symbol counts")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    run([int(float(s)) for s in args.sizes.split(",")], args.repeats)


if __name__ == "__main__":
    main()
