// Canonical Huffman coding of uint8/uint16 symbol streams: framework-free kernel on raw pointers.
//
// Algorithms
//   * Code lengths: optimal length-limited prefix code by package-merge (Larmore & Hirschberg,
//     "A fast algorithm for optimal length-limited Huffman codes", JACM 1990). With a limit that
//     does not bind, its total bit count equals Huffman's (Huffman 1952).
//   * Code assignment: canonical codes (Schwartz & Kallick 1964), assigned exactly as in RFC 1951
//     section 3.2.2: shorter codes first, within one length in increasing symbol order.
//   * Decoding: table driven. A primary table of 2^kTableBits entries indexed by the next
//     kTableBits bits yields up to 6 (uint8) or 3 (uint16) whole symbols per lookup (the
//     multi-symbol idea of huff0's "X2" tables, generalised); codes longer than kTableBits are
//     decoded without branches from the canonical limits. Four bitstreams (one per contiguous
//     chunk of the symbols) are decoded in lock step, 5 lookups per 64-bit reload, for
//     instruction-level parallelism, like zstd's 4-stream Huffman literals; a bounds-checked tail
//     finishes each bitstream. On x86-64 a BMI2 build of the loop is chosen at run time (the
//     environment variable PYSERVE_HUFFMAN_NO_BMI2, set to anything, forces the portable one).
//
// Limits: code lengths are at most kMaxCodeLength = 20 bits (a 65536-symbol alphabet needs 16);
// the limit costs nothing unless symbol counts are extremely skewed (Fibonacci-like), and keeps
// every code inside one 64-bit load at any bit offset.
//
// Stream layout (format version 1; all integers little-endian; bit order within bitstreams is
// MSB-first, i.e. the first code's first bit is bit 7 of the bitstream's first byte):
//
//   offset  size   field
//   0       4      magic, ASCII "PSHF"
//   4       1      format version = 1
//   5       1      symbol dtype: 1 = uint8, 2 = uint16
//   6       1      S, number of bitstreams: 0 if N == 0, else 1..16 (the encoder writes 1 for
//                  N < 32768 and 4 otherwise)
//   7       1      T, code-length table mode: 0 = dense range, 1 = sparse list (0 if N == 0)
//   8       8      N, symbol count (uint64)
//   16      4      A, code-length table entries (uint32): 0 iff N == 0
//   20      2      F, first symbol of the dense range (uint16); 0 for T == 1
//   22      ...    code-length table
//                    T == 0: A bytes; byte i is the code length of symbol F + i (0 = symbol absent);
//                            F + A <= 256 (uint8) or 65536 (uint16)
//                    T == 1: A entries of 3 bytes: symbol (uint16, strictly increasing), code length
//                            (uint8, 1..20)
//   ...     8*S    bit length of each bitstream (uint64)
//   ...     ...    the S bitstreams, each zero-padded to a whole byte, back to back; the buffer ends
//                  exactly after the last one
//
//   Bitstream s holds symbols [s*C, min(N, (s+1)*C)) with C = ceil(N / S).
//
// Format version 2 ("chunked"): what a GPU decodes with one thread per chunk, and what any decoder
// can split across threads. The same as version 1 except:
//   6       1      0 (reserved; the chunk count follows from N and C)
//   ...     4      C, symbols per chunk (uint32, 1..2^24), after the code-length table (N > 0 only)
//   ...     4*S    bit length of each chunk (uint32), S = ceil(N / C)
//   ...     ...    the S chunks, each zero-padded to a whole byte, back to back
//   Chunk s holds symbols [s*C, min(N, (s+1)*C)); every chunk starts on a byte boundary, so the
//   bit lengths alone give each chunk's offset (a prefix sum). Overhead against version 1: 4 bytes
//   plus under one byte of padding per chunk (about 0.05% for C = 16384 at 5 bits per symbol).
//   Code lengths lie in 1..20; with two or more symbols present they satisfy the Kraft equality
//   sum 2^-len == 1 exactly (a complete code); a single present symbol has length 1 (code "0").
//   A decoder rejects anything else, plus: padding bits that are not zero, a bitstream whose bit
//   length is impossible for its symbol count (shorter than count * shortest code or longer than
//   count * longest code), a bitstream that does not decode to exactly its count of symbols in
//   exactly its bit length, and trailing bytes. Hence N <= 8 * (buffer size): a decoder never
//   allocates more than 16 bytes of output per input byte.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pyserve {
namespace huffman {

constexpr int kMaxCodeLength = 20;
constexpr int kTableBits = 11;  // 2^11 entries x 8 bytes: a 16 KiB primary table (measured best of 10..12)
constexpr uint8_t kFormatVersion = 1;
constexpr uint8_t kFormatVersionChunked = 2;
constexpr uint64_t kMaxChunkSymbols = uint64_t{1} << 24;  // keeps a chunk's bit length below 2^32
constexpr int kMaxStreams = 16;
constexpr std::size_t kHeaderBytes = 22;
constexpr uint64_t kMultiStreamThreshold = 32768;  // N at or above which the encoder uses 4 streams
constexpr int kEncoderStreams = 4;

enum class SymbolType : uint8_t { kUint8 = 1, kUint16 = 2 };

inline int alphabet_size(SymbolType t) { return t == SymbolType::kUint8 ? 256 : 65536; }
inline int symbol_bytes(SymbolType t) { return t == SymbolType::kUint8 ? 1 : 2; }

// Everything the encoder decides before writing: code lengths, codes, stream sizes, output size.
struct EncodePlan {
  SymbolType type = SymbolType::kUint8;
  uint64_t count = 0;
  int num_streams = 0;
  int table_mode = 0;               // 0 dense, 1 sparse
  uint32_t table_entries = 0;       // A
  uint16_t first_symbol = 0;        // F
  uint32_t lo = 0;                  // smallest symbol present; the arrays below start there
  std::vector<uint8_t> lengths;     // [hi - lo + 1] code length of symbol lo + i, 0 = absent
  std::vector<uint32_t> codes;      // [hi - lo + 1] canonical code of symbol lo + i, right-aligned
  std::vector<uint64_t> stream_bits;  // [num_streams]
  uint64_t chunk_symbols = 0;       // 0: format version 1; else version 2 with chunks of this many symbols
  std::size_t total_bytes = 0;      // exact size of the encoded stream
};

// Optimal length-limited code lengths by package-merge.
//   weights: [m] positive, sorted ascending; 2 <= m <= 2^limit; 1 <= limit <= kMaxCodeLength.
//   lengths_out: [m] code lengths (non-increasing), satisfying the Kraft equality.
void package_merge_lengths(const uint64_t* weights, int m, int limit, uint8_t* lengths_out);

// Canonical code assignment (RFC 1951 3.2.2). lengths: [n] (0 = absent), codes_out: [n].
// Returns false if the lengths oversubscribe the code space.
bool canonical_codes(const uint8_t* lengths, int n, uint32_t* codes_out);

// Phase 1 of encoding: histogram, code lengths, codes, stream sizes. symbols: [count] of `type`.
// chunk_symbols == 0 plans format version 1 (1 bitstream, or 4 from kMultiStreamThreshold symbols
// on); 1..kMaxChunkSymbols plans format version 2 with chunks of that many symbols.
void plan_encode(const void* symbols, uint64_t count, SymbolType type, EncodePlan* plan, uint64_t chunk_symbols = 0);

// Phase 2: write the stream into out[0 .. plan.total_bytes). Returns false if out_size is too small.
bool write_encoded(const void* symbols, const EncodePlan& plan, uint8_t* out, std::size_t out_size);

// A parsed, validated stream header (the bitstream contents are checked while decoding).
struct StreamInfo {
  SymbolType type = SymbolType::kUint8;
  int version = 1;
  uint64_t count = 0;
  uint64_t chunk_symbols = 0;          // C: version 1 ceil(N / S), version 2 as stored
  int num_streams = 0;                 // S: bitstreams (version 1) or chunks (version 2)
  uint32_t first_symbol = 0;           // lengths[i] belongs to symbol first_symbol + i
  std::vector<uint8_t> lengths;        // [range] code lengths, 0 = absent
  std::vector<uint64_t> stream_bits;   // [num_streams]
  std::vector<uint64_t> stream_offset; // [num_streams] byte offset of each bitstream in the buffer
  std::vector<uint64_t> stream_count;  // [num_streams] symbols in each bitstream
  std::vector<uint64_t> stream_begin;  // [num_streams] index of each bitstream's first symbol
};

// The canonical decoding tables of a parsed stream, in a form a GPU kernel can take: a 2^kTableBits
// primary table (symbol << 8 | length for codes of at most kTableBits bits, 0 where a longer code
// starts) and, per length l, the first code, the number of codes and their offset in `sorted`
// (symbols ordered by (length, symbol)).
struct CanonicalTables {
  std::vector<uint32_t> single;                       // [2^kTableBits]
  // [2^kTableBits] the host decoder's multi-symbol entries: bits 0-5 the bits of the whole codes
  // that fit in the index, bits 8-55 their symbols packed little-endian (up to 6 uint8 or 3
  // uint16), bits 56-63 their number (0: the next code is longer than kTableBits bits, or none).
  std::vector<uint64_t> multi;
  uint32_t first_code[kMaxCodeLength + 2] = {};
  uint32_t count[kMaxCodeLength + 2] = {};
  uint32_t offset[kMaxCodeLength + 2] = {};
  std::vector<uint16_t> sorted;
  int max_len = 0;
};
void build_canonical_tables(const StreamInfo& info, CanonicalTables* out);

// Parses and validates the header, code lengths and bitstream sizes of data[0 .. size).
// Returns false and sets *error on any malformation; never reads outside the buffer.
bool parse_stream(const uint8_t* data, std::size_t size, StreamInfo* info, std::string* error);

// Decodes the bitstreams described by `info` (from parse_stream on the same buffer) into
// out[0 .. info.count) of info.type. Returns false and sets *error if a bitstream is inconsistent;
// never reads outside data[0 .. size) nor writes outside out[0 .. info.count). Version 2 streams
// with more than 16 chunks are decoded in blocks of 16 chunks over up to `threads` OpenMP threads
// (the message names the first failing block's problem whatever the thread count).
bool decode_symbols(const uint8_t* data, std::size_t size, const StreamInfo& info, void* out,
                    std::string* error, int threads = 1);

}  // namespace huffman
}  // namespace pyserve
