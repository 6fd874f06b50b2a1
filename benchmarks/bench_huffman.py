"""Huffman coding of quantized-weight index streams vs zstandard and zlib (issue 3's matrix).

Streams (uint8 symbols, as Deep Compression stores them; Han, Mao & Dally 2016, sections 2-4):
  kmeans5   5-bit k-means codebook indices of a 90%-pruned layer: the surviving weights of a
            Laplacian layer (|w| above the 90% magnitude quantile t, i.e. sign * (t + Exp(b)) by the
            exponential's memorylessness), clustered into 32 centroids by pyserve's own
            ``kmeans_1d`` (linear initialisation, as in the paper) on a 10^6 sample; each weight's
            index is its nearest centroid
  kmeans8   the same with 8 bits (256 centroids: the paper's width for conv layers)
  gaps8     8-bit relative-index gaps (``gap - 1``, fillers of 255 for longer gaps) of a 90%-pruned
            [rows, 4096] layer whose rows keep 2-30% of their weights (density ~ Beta(2, 18)), made
            by pyserve's own ``artifact.encoding.relative_indices``
  kmeans32  (earlier table) a Laplacian(scale 2.5) over 32 symbols, clipped
  gaps90    (earlier table) geometric(p = 0.1) gaps capped at 255

For each stream and size: our stream's size against the optimal unconstrained Huffman code of the
same symbols (heapq-built code lengths, ``pyserve.ops.reference.huffman_code_lengths``, times the
counts, plus the same header and code-length table ours carries: 22 + table + 8 * bitstreams bytes)
and against the Shannon bound (entropy * n / 8 bytes, no header); then every codec's size and
decode speed. Decode times are thread-CPU-time medians of --repeats interleaved rounds (each round
decodes once with every codec, so load changes hit all codecs alike), MB/s of symbols (10^6
symbols/s); encode speed is one call's thread CPU time; "dec vs peer" is peer time / our time
(> 1: we are faster). Every decode allocates its output (numpy array / bytes), as a user's call
does. Format version 1 decodes on one thread (so does zstd's decompression). With
--chunked-threads N two more rows: format version 2 (independently decodable chunks of 16384
symbols) on one thread, and on N threads, timed by the wall clock (thread CPU time would miss the
other threads; on a loaded machine a descheduled thread stalls the whole call).

    python benchmarks/bench_huffman.py [--sizes 1,16,64] [--streams kmeans5,kmeans8,gaps8,kmeans32,gaps90]
                                       [--repeats 9] [--chunked-threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import zlib

import numpy as np

from pyserve.artifact.encoding import relative_indices
from pyserve.compress.quantize import kmeans_1d
from pyserve.ops import HUFFMAN_TABLE_BITS, build_info, huffman_decode, huffman_encode, set_num_threads
from pyserve.ops import reference as ref

try:
    import zstandard
except ImportError:  # pragma: no cover - optional peer
    zstandard = None


def _pruned_laplace_survivors(n: int, rng: np.random.Generator, scale: float = 0.02, sparsity: float = 0.9):
    t = -scale * np.log(1.0 - sparsity)  # P(|w| > t) = 1 - sparsity for Laplace(0, scale)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return sign * (t + rng.exponential(scale, n))


def _kmeans_indices(n: int, rng: np.random.Generator, bits: int) -> np.ndarray:
    w = _pruned_laplace_survivors(n, rng)
    centroids, _ = kmeans_1d(w[: min(n, 1_000_000)], 1 << bits, init="linear", iterations=30)
    c = np.sort(centroids.astype(np.float64))
    return np.searchsorted((c[1:] + c[:-1]) / 2.0, w).astype(np.uint8)


def kmeans5(n: int, rng: np.random.Generator) -> np.ndarray:
    return _kmeans_indices(n, rng, 5)


def kmeans8(n: int, rng: np.random.Generator) -> np.ndarray:
    return _kmeans_indices(n, rng, 8)


def gaps8(n: int, rng: np.random.Generator) -> np.ndarray:
    cols = 4096
    out = []
    total = 0
    while total < n:  # rows of varying density until n symbols exist
        rows = 512
        density = np.clip(rng.beta(2.0, 18.0, rows), 0.02, 0.30)
        mask = rng.random((rows, cols)) < density[:, None]
        symbols, _ = relative_indices(np.flatnonzero(mask), 8, mask.size)
        out.append(symbols)
        total += symbols.size
    return np.concatenate(out)[:n]


def kmeans32(n: int, rng: np.random.Generator) -> np.ndarray:
    return (np.clip(np.round(rng.laplace(0.0, 2.5, n)), -16, 15) + 16).astype(np.uint8)


def gaps90(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(rng.geometric(0.1, n), 255).astype(np.uint8)


CHUNK_SYMBOLS = 16384  # format version 2 rows (--chunked-threads)

STREAMS = {"kmeans5": kmeans5, "kmeans8": kmeans8, "gaps8": gaps8, "kmeans32": kmeans32, "gaps90": gaps90}


def _decode_threads(n: int):
    def dec(blob):
        set_num_threads(n)
        return huffman_decode(blob)
    return dec


def codecs(chunked_threads: int = 0):
    """(name, encode, decode, clock) of each codec; `clock` times one decode call."""
    yield "pyserve", huffman_encode, _decode_threads(1), time.thread_time
    if chunked_threads:
        def enc(x):
            return huffman_encode(x, chunk_symbols=CHUNK_SYMBOLS)
        yield "pyserve v2", enc, _decode_threads(1), time.thread_time
        # several threads: wall-clock time of the call (thread time would miss the other threads)
        yield f"pyserve v2 x{chunked_threads}", enc, _decode_threads(chunked_threads), time.perf_counter
    if zstandard is not None:
        for level in (3, 19):
            cctx = zstandard.ZstdCompressor(level=level, threads=0)
            dctx = zstandard.ZstdDecompressor()
            yield f"zstd -{level}", (lambda b, c=cctx: c.compress(b)), dctx.decompress, time.thread_time
    yield "zlib -9", (lambda b: zlib.compress(b, 9)), zlib.decompress, time.thread_time


def optimal_huffman_bytes(x: np.ndarray, stream: bytes) -> tuple[int, int, float]:
    """(optimal unconstrained Huffman size in bytes with our header, header bytes, fraction of
    symbols whose code in `stream` is longer than the decoder's table)."""
    counts = np.bincount(x, minlength=256)
    parsed = ref.parse_huffman_stream(stream)
    payload_bytes = sum(len(b) for b in parsed.bitstreams)
    header = len(stream) - payload_bytes
    bits = ref.total_bits(counts, ref.huffman_code_lengths(counts))
    optimal = header + (bits + 7) // 8  # ours also pads each of its bitstreams to a whole byte
    ours_lengths = parsed.lengths
    long_share = float(counts[ours_lengths > HUFFMAN_TABLE_BITS].sum()) / max(x.size, 1)
    assert payload_bytes >= (ref.total_bits(counts, ours_lengths) + 7) // 8
    return optimal, header, long_share


def symbols_per_lookup(x: np.ndarray, stream: bytes, limit: int = 1_000_000) -> float:
    """Symbols per primary-table lookup of our decoder on the first `limit` symbols: each lookup
    takes the whole codes (at most 6) that fit in HUFFMAN_TABLE_BITS bits; a longer code costs one
    lookup that finds no whole code plus one long-code step (counted as a second lookup)."""
    lengths = ref.parse_huffman_stream(stream).lengths[x[:limit]].tolist()
    lookups = 0
    i = 0
    n = len(lengths)
    while i < n:
        if lengths[i] > HUFFMAN_TABLE_BITS:
            lookups += 2
            i += 1
            continue
        used = taken = 0
        while i < n and taken < 6 and used + lengths[i] <= HUFFMAN_TABLE_BITS:
            used += lengths[i]
            taken += 1
            i += 1
        lookups += 1
    return n / max(lookups, 1)


def run(sizes_mb: list[float], names: list[str], repeats: int, chunked_threads: int = 0) -> None:
    info = build_info()
    load = os.getloadavg()
    print(f"pyserve {info['version']} ({info['compiler']}), numpy {np.__version__}, "
          f"zstandard {getattr(zstandard, '__version__', 'not installed')}, zlib {zlib.ZLIB_VERSION}, "
          f"cpus {os.cpu_count()}, one thread, thread-CPU-time median of {repeats} interleaved rounds, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    for name in names:
        for mb in sizes_mb:
            n = int(mb * 1_000_000)
            x = STREAMS[name](n, np.random.default_rng(0))
            raw = x.tobytes()
            p = np.bincount(x, minlength=256) / n
            entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
            rows = []
            for codec, enc, dec, clock in codecs(chunked_threads):
                payload = x if codec.startswith("pyserve") else raw
                t0 = time.thread_time()
                blob = enc(payload)
                t_enc = time.thread_time() - t0  # one call, CPU time (zstd -19 of 64 MB takes minutes)
                out = dec(blob)
                got = np.frombuffer(out, np.uint8) if isinstance(out, bytes) else out
                if not np.array_equal(got, x):
                    raise AssertionError(f"{codec} did not round-trip {name}")
                rows.append([codec, blob, dec, t_enc, [], clock])
            for _ in range(repeats):  # interleaved rounds
                for row in rows:
                    clock = row[5]
                    t0 = clock()
                    row[2](row[1])
                    row[4].append(clock() - t0)
            ours = rows[0][1]
            optimal, header, long_share = optimal_huffman_bytes(x, ours)
            t_ours = statistics.median(rows[0][4])
            print(f"\n{name} {mb:g} MB: {n:,} uint8 symbols, {np.count_nonzero(p)} distinct, entropy {entropy:.3f} "
                  f"bits/symbol; ours {len(ours):,} B = {8 * len(ours) / n:.3f} bits/symbol; optimal Huffman "
                  f"{optimal:,} B (header {header} B): ours +{100 * (len(ours) / optimal - 1):.3f}%; Shannon bound "
                  f"{entropy * n / 8:,.0f} B: ours +{100 * (len(ours) / (entropy * n / 8) - 1):.2f}%; "
                  f"codes longer than {HUFFMAN_TABLE_BITS} bits: {100 * long_share:.2f}% of symbols; "
                  f"{symbols_per_lookup(x, ours):.2f} symbols per table lookup")
            header_line = (f"{'codec':<10} {'bytes':>12} {'bits/sym':>9} {'enc MB/s':>9} {'dec MB/s':>9} "
                           f"{'size vs ours':>13} {'dec vs peer':>12}")
            print(header_line)
            print("-" * len(header_line))
            for codec, blob, _, t_enc, times, _clock in rows:
                t = statistics.median(times)
                print(f"{codec:<10} {len(blob):>12,} {8 * len(blob) / n:>9.3f} {n / t_enc / 1e6:>9.0f} "
                      f"{n / t / 1e6:>9.0f} {len(blob) / len(ours):>12.3f}x {t / t_ours:>11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,16,64", help="comma-separated stream sizes in MB (10^6 symbols)")
    parser.add_argument("--streams", default=",".join(STREAMS), help=f"comma-separated, of {','.join(STREAMS)}")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--chunked-threads", type=int, default=0, metavar="N",
                        help="also time format version 2 (chunks of 16384 symbols) on 1 thread and on N threads "
                             "(wall clock); 0 (default) leaves them out")
    args = parser.parse_args()
    names = [s for s in args.streams.split(",") if s]
    unknown = sorted(set(names) - set(STREAMS))
    if unknown:
        parser.error(f"--streams: unknown stream(s) {unknown}; expected some of {list(STREAMS)}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected >= 1, got {args.repeats}")
    if args.chunked_threads < 0:
        parser.error(f"--chunked-threads: expected >= 0, got {args.chunked_threads}")
    run([float(s) for s in args.sizes.split(",")], names, args.repeats, args.chunked_threads)


if __name__ == "__main__":
    main()
