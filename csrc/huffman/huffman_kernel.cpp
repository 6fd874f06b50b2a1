// Canonical Huffman encode/decode kernels on raw pointers. Layout and algorithms: huffman_kernel.h.
#include "huffman/huffman_kernel.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <thread>

#include "common/checks.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pyserve's Huffman kernel stores packed symbols with little-endian word writes"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PYSERVE_LIKELY(x) __builtin_expect(!!(x), 1)
#define PYSERVE_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define PYSERVE_INLINE inline __attribute__((always_inline))
#define PYSERVE_NOINLINE __attribute__((noinline))
#else
#define PYSERVE_LIKELY(x) (x)
#define PYSERVE_UNLIKELY(x) (x)
#define PYSERVE_INLINE inline
#define PYSERVE_NOINLINE
#endif

namespace pyserve {
namespace huffman {
namespace {

constexpr char kOp[] = "huffman";
constexpr uint8_t kMagic[4] = {'P', 'S', 'H', 'F'};
constexpr int kL = kMaxCodeLength;
constexpr int kK = kTableBits;
constexpr uint32_t kTableSize = 1u << kK;
constexpr int kGroup = 5;  // table lookups per reload in the fast decode loop (5 x 11 = 55 <= 57 bits)
constexpr int kLanes = 4;  // bitstreams decoded in lock step (2 is much slower; 6 and 8 measured no faster)
constexpr uint64_t kLongCode = 0x80;  // flag in a primary-table entry (see DecodeTables::multi)

static_assert(kK < kL, "the primary table must be shorter than the longest code");
static_assert(kL <= 32 - 7, "the tail decoder peeks 32 bits at any bit offset");

// ---- byte helpers -------------------------------------------------------------------------------
PYSERVE_INLINE uint64_t bswap64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bswap64(v);
#else
  uint64_t r = 0;
  for (int i = 0; i < 8; ++i) r = (r << 8) | ((v >> (8 * i)) & 0xff);
  return r;
#endif
}
PYSERVE_INLINE uint64_t load_be64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return bswap64(v);
}
PYSERVE_INLINE void store_be64(uint8_t* p, uint64_t v) {
  v = bswap64(v);
  std::memcpy(p, &v, 8);
}
inline uint64_t read_le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}
inline void write_le(uint8_t* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Symbols of bitstream / chunk s when each holds `chunk` symbols: [s*C, min(N, (s+1)*C)).
// Version 2 stores C; version 1 has C = ceil(N / S) (stream_chunk). Requires N < 2^63.
inline void chunk_range(uint64_t n, uint64_t chunk, uint64_t s, uint64_t* begin, uint64_t* count) {
  const uint64_t b = std::min<uint64_t>(n, chunk * s);
  *begin = b;
  *count = std::min<uint64_t>(n, b + chunk) - b;
}
inline uint64_t stream_chunk(uint64_t n, int num_streams) { return n / num_streams + (n % num_streams != 0); }
inline void stream_range(uint64_t n, int num_streams, int s, uint64_t* begin, uint64_t* count) {
  chunk_range(n, stream_chunk(n, num_streams), static_cast<uint64_t>(s), begin, count);
}

// ---- histograms ---------------------------------------------------------------------------------
template <typename T>
void min_max(const T* p, uint64_t n, uint32_t* lo, uint32_t* hi) {
  T mn = p[0], mx = p[0];
  for (uint64_t i = 1; i < n; ++i) {
    mn = std::min(mn, p[i]);
    mx = std::max(mx, p[i]);
  }
  *lo = mn;
  *hi = mx;
}

// hist[i] += count of symbol lo + i, for i < range (every symbol lies in [lo, lo + range)).
// Four interleaved sub-histograms hide the store-to-load dependency on runs of one symbol.
void histogram_u8(const uint8_t* p, uint64_t n, uint32_t lo, uint32_t range, uint64_t* hist) {
  uint32_t sub[4][256];
  while (n > 0) {
    const uint64_t block = std::min<uint64_t>(n, uint64_t{1} << 30);
    std::memset(sub, 0, sizeof(sub));
    uint64_t i = 0;
    for (; i + 16 <= block; i += 16) {
      uint64_t a, b;
      std::memcpy(&a, p + i, 8);
      std::memcpy(&b, p + i + 8, 8);
      for (int k = 0; k < 8; k += 2) {
        ++sub[0][(a >> (8 * k)) & 0xff];
        ++sub[1][(a >> (8 * k + 8)) & 0xff];
        ++sub[2][(b >> (8 * k)) & 0xff];
        ++sub[3][(b >> (8 * k + 8)) & 0xff];
      }
    }
    for (; i < block; ++i) ++sub[0][p[i]];
    for (uint32_t k = 0; k < range; ++k)
      hist[k] += uint64_t{sub[0][lo + k]} + sub[1][lo + k] + sub[2][lo + k] + sub[3][lo + k];
    p += block;
    n -= block;
  }
}

// The index is clamped into [0, range): symbols outside it only appear if another thread writes the
// array during encoding, and must not make us write outside `hist`.
void histogram_u16(const uint16_t* p, uint64_t n, uint32_t lo, uint32_t range, uint64_t* hist) {
  const uint32_t last = range - 1;
  auto idx = [&](uint16_t v) { return std::min<uint32_t>(static_cast<uint32_t>(v) - lo, last); };
  if (n <= 65536) {  // too few symbols to pay for sub-histograms
    for (uint64_t i = 0; i < n; ++i) ++hist[idx(p[i])];
    return;
  }
  std::vector<uint32_t> sub(2 * static_cast<std::size_t>(range));
  uint32_t* h0 = sub.data();
  uint32_t* h1 = h0 + range;
  while (n > 0) {
    const uint64_t block = std::min<uint64_t>(n, uint64_t{1} << 31);
    std::fill(sub.begin(), sub.end(), 0u);
    uint64_t i = 0;
    for (; i + 2 <= block; i += 2) {
      ++h0[idx(p[i])];
      ++h1[idx(p[i + 1])];
    }
    for (; i < block; ++i) ++h0[idx(p[i])];
    for (uint32_t k = 0; k < range; ++k) hist[k] += uint64_t{h0[k]} + h1[k];
    p += block;
    n -= block;
  }
}

// ---- encoder bit writer -------------------------------------------------------------------------
// `acc` holds `cnt` pending bits left-aligned (bit 63 first). tab[(sym - lo) & mask] = code << 8 |
// length; the mask keeps the lookup inside `tab` even if another thread changes the symbols after
// planning (a data race the caller owns: the stream is then wrong and write_encoded's size check
// fails, but no memory outside the buffers is touched).
// A flush stores 8 bytes big-endian when there is room (bytes past the pending bits are rewritten
// by later flushes or by the next bitstream), else byte by byte up to the buffer end.
template <typename T, int kPutsPerFlush>
uint8_t* encode_chunk(const T* sym, uint64_t n, uint32_t lo, uint32_t mask, const uint32_t* tab, uint8_t* out,
                      uint8_t* buf_end) {
  uint64_t acc = 0;
  unsigned cnt = 0;
  auto put = [&](uint32_t e) {
    const unsigned len = e & 0xff;
    acc |= static_cast<uint64_t>(e >> 8) << (64 - cnt - len);
    cnt += len;
  };
  auto flush = [&]() {
    if (PYSERVE_LIKELY(buf_end - out >= 8)) {
      store_be64(out, acc);
    } else {
      const unsigned nbytes = (cnt + 7) >> 3;
      for (unsigned b = 0; b < nbytes && out + b < buf_end; ++b) out[b] = static_cast<uint8_t>(acc >> (56 - 8 * b));
    }
    out += cnt >> 3;
    acc <<= (cnt & ~7u);
    cnt &= 7;
  };
  uint64_t i = 0;
  for (; i + kPutsPerFlush <= n; i += kPutsPerFlush) {
    for (int k = 0; k < kPutsPerFlush; ++k) put(tab[(sym[i + k] - lo) & mask]);
    flush();
  }
  for (; i < n; ++i) {
    put(tab[(sym[i] - lo) & mask]);
    flush();
  }
  return out + (cnt != 0);  // the partial last byte was already stored by the last flush
}

template <typename T>
uint8_t* encode_chunk_dispatch(const T* sym, uint64_t n, uint32_t lo, uint32_t mask, const uint32_t* tab, int max_len,
                               uint8_t* out, uint8_t* buf_end) {
  // After a flush at most 7 bits are pending; with P more codes of max_len bits the count must
  // stay <= 63 (a flush shifts the accumulator by up to cnt & ~7 bits, and a shift by 64 is UB).
  if (4 * max_len <= 56) return encode_chunk<T, 4>(sym, n, lo, mask, tab, out, buf_end);
  if (3 * max_len <= 56) return encode_chunk<T, 3>(sym, n, lo, mask, tab, out, buf_end);
  return encode_chunk<T, 2>(sym, n, lo, mask, tab, out, buf_end);
}

// ---- decoder tables -----------------------------------------------------------------------------
struct DecodeTables {
  // single[i]: symbol << 8 | length for the code that is a prefix of the kK-bit index i;
  // length 0 if that prefix starts a code longer than kK bits (or no code: incomplete code).
  std::array<uint32_t, kTableSize> single;
  // multi[i]: bits 0-5 total bits of the whole codes (0..kK), bit 7 kLongCode (no whole code
  // within kK bits: the next code is longer, or no code at all), bits 8-55 the symbols packed
  // little-endian (6 x uint8 or 3 x uint16), bits 56-63 the number of whole symbols (0 with
  // kLongCode). The layout makes a lookup cheap: `buf << e` takes the bit count from the low six
  // bits as x86's shift does, `e >> 8` is what gets stored, `e >> 56` advances the output.
  std::array<uint64_t, kTableSize> multi;
  uint32_t first_code[kL + 2];
  uint32_t count[kL + 2];
  uint32_t offset[kL + 2];
  // limit[l]: one past the last code of length <= l, left-aligned to kL bits (codes of length l
  // occupy [limit[l-1], limit[l]) in that alignment); limit[l] = limit[max_len] for l > max_len.
  uint32_t limit[kL + 2];
  std::vector<uint16_t> sorted;  // symbols ordered by (length, symbol)
  int min_len = 0;
  int max_len = 0;
};

// lengths[i] is the code length of symbol first + i (0 = absent).
void build_tables(const std::vector<uint8_t>& lengths, uint32_t first, int symbol_size, DecodeTables* t) {
  std::fill(std::begin(t->count), std::end(t->count), 0u);
  const int n = static_cast<int>(lengths.size());
  for (int s = 0; s < n; ++s)
    if (lengths[s]) ++t->count[lengths[s]];
  t->min_len = 0;
  t->max_len = 0;
  uint32_t total = 0;
  uint32_t code = 0;
  for (int l = 1; l <= kL; ++l) {
    code = (code + (l > 1 ? t->count[l - 1] : 0)) << 1;
    t->first_code[l] = code;
    t->offset[l] = total;
    total += t->count[l];
    if (t->count[l]) {
      if (!t->min_len) t->min_len = l;
      t->max_len = l;
    }
  }
  // first_code[1] must be 0 (RFC 1951 starts at code 0); the loop above yields 0 << 1 == 0.
  for (int l = 0; l <= kL + 1; ++l) {
    const int ll = std::min(std::max(l, 1), std::max(t->max_len, 1));
    t->limit[l] = l == 0 ? 0u : (t->first_code[ll] + t->count[ll]) << (kL - ll);
  }
  t->sorted.assign(total, 0);
  uint32_t fill[kL + 2];
  std::copy(std::begin(t->offset), std::end(t->offset), std::begin(fill));
  for (int s = 0; s < n; ++s)
    if (lengths[s]) t->sorted[fill[lengths[s]]++] = static_cast<uint16_t>(first + s);

  t->single.fill(0u);
  for (int l = 1; l <= std::min(kK, t->max_len); ++l) {
    for (uint32_t j = 0; j < t->count[l]; ++j) {
      const uint32_t c = t->first_code[l] + j;
      const uint32_t start = c << (kK - l);
      const uint32_t span = 1u << (kK - l);
      const uint32_t entry = (static_cast<uint32_t>(t->sorted[t->offset[l] + j]) << 8) | static_cast<uint32_t>(l);
      for (uint32_t k = 0; k < span; ++k) t->single[start + k] = entry;
    }
  }
  const int max_syms = symbol_size == 1 ? 6 : 3;
  const int sym_bits = 8 * symbol_size;
  for (uint32_t i = 0; i < kTableSize; ++i) {
    int pos = 0;
    int nsym = 0;
    uint64_t syms = 0;
    while (nsym < max_syms) {
      const uint32_t e = t->single[(i << pos) & (kTableSize - 1)];
      const int len = static_cast<int>(e & 0xff);
      if (len == 0 || len > kK - pos) break;
      syms |= static_cast<uint64_t>(e >> 8) << (8 + nsym * sym_bits);
      ++nsym;
      pos += len;
    }
    t->multi[i] = nsym == 0 ? kLongCode : syms | (static_cast<uint64_t>(nsym) << 56) | static_cast<uint64_t>(pos);
  }
}

// Codes longer than kK bits, without branches: v = the next kL bits, right-aligned, whose first kK
// bits start no code of length <= kK. In a canonical code the lengths increase with v (left-aligned),
// so the length is kK + 1 plus the number of limits v has passed (a data-dependent loop exit here
// costs a branch mispredict per long code). Returns the length, or 0 if v is past the last code
// (only the lone-symbol code "0" leaves such patterns: parse_stream demands a complete code
// otherwise). *sym is always written from inside `sorted`, also for a v that is no long code.
PYSERVE_INLINE int long_lookup(const DecodeTables& t, uint32_t v, uint32_t* sym) {
  int len = kK + 1;
  for (int l = kK + 1; l < kL; ++l) len += v >= t.limit[l];
  const uint32_t idx = t.offset[len] + ((v >> (kL - len)) - t.first_code[len]);
  const uint32_t last = static_cast<uint32_t>(t.sorted.size()) - 1;
  *sym = t.sorted[idx < last ? idx : last];
  return v < t.limit[kL] ? len : 0;
}

// ---- decoder bit reader -------------------------------------------------------------------------
// A lane decodes one bitstream. `pos` is its absolute bit position in the whole buffer at the last
// reload (all lanes share the base pointer, which saves registers). A reload puts the 8 bytes at
// pos / 8 into `buf`, shifted so that bit 63 is stream bit `pos`; bits 63..7 (57 bits) are data,
// bit 6 is a marker and bits 5..0 are zero. Lookups shift `buf` left, so the bits consumed since
// the reload are ctz(buf) - 6, with no per-lookup bookkeeping.
//
// A group is kGroup primary-table lookups per lane, branch-free: an entry that ends in a long
// code (kLongCode: 0 bits, 0 symbols) stalls its lane for the rest of the group, and the group
// ends by decoding one long code for each stalled lane. Lookup k of a group reads bits
// k*kK .. (k+1)*kK - 1 at most, so kGroup * kK <= 57 keeps every window inside the data bits and
// the marker inside `buf`.
template <typename T>
struct Lane {
  uint64_t pos;
  uint64_t buf;
  T* out;
};

template <typename T>
struct LaneBounds {
  uint64_t end_byte;  // absolute index one past the bitstream's last byte
  T* out_end;
};

static_assert(kGroup * kK <= 57, "every lookup window of a group must lie in the 57 data bits");

PYSERVE_INLINE uint64_t load_bits(const uint8_t* data, uint64_t pos) {
  return ((load_be64(data + (pos >> 3)) << (pos & 7)) & ~uint64_t{0x7f}) | uint64_t{0x40};
}

PYSERVE_INLINE unsigned consumed_bits(uint64_t buf) {
#if defined(__GNUC__) || defined(__clang__)
  return static_cast<unsigned>(__builtin_ctzll(buf)) - 6;
#else
  unsigned n = 0;
  while (!((buf >> n) & 1)) ++n;
  return n - 6;
#endif
}

template <typename T>
constexpr int max_syms_per_lookup() {
  return sizeof(T) == 1 ? 6 : 3;
}

// How many whole groups may run before the bounds must be checked again. A group consumes at
// most kGroup * kK + kL bits (8 bytes); its loads start at most (7 + kGroup * kK) / 8 = 6 bytes
// past the group's first byte and read 8. Output advances by at most kGroup * max_syms + 1
// symbols, and an 8-byte store may reach 8 / sizeof(T) symbols past a lookup's start.
template <typename T>
PYSERVE_INLINE std::ptrdiff_t safe_groups(const Lane<T>& l, const LaneBounds<T>& b) {
  constexpr uint64_t in_step = (kGroup * kK + kL + 7) / 8;
  constexpr uint64_t in_need = (7 + kGroup * kK) / 8 + 8;
  constexpr std::ptrdiff_t out_step = kGroup * max_syms_per_lookup<T>() + 1;
  constexpr std::ptrdiff_t out_need = out_step + static_cast<std::ptrdiff_t>(8 / sizeof(T));
  const uint64_t byte = l.pos >> 3;
  const uint64_t in = b.end_byte > byte ? b.end_byte - byte : 0;
  const std::ptrdiff_t out = b.out_end - l.out;
  if (in < in_need || out < out_need) return 0;
  return std::min(static_cast<std::ptrdiff_t>((in - in_need) / in_step), (out - out_need) / out_step) + 1;
}

// One primary-table lookup, no branches. Returns the entry (for the kLongCode test).
template <typename T>
PYSERVE_INLINE uint64_t step(Lane<T>& l, const DecodeTables& t) {
  const uint64_t e = t.multi[l.buf >> (64 - kK)];
  const uint64_t syms = e >> 8;
  std::memcpy(l.out, &syms, 8);
  l.out += e >> 56;
  l.buf <<= (e & 63);
  return e;
}

// Ends a group: folds the consumed bits into pos and, if the lane stalled on a long code,
// decodes that code out of line. Returns false on a bit pattern that is no code.
template <typename T>
PYSERVE_NOINLINE bool long_code(Lane<T>& l, const uint8_t* data, const DecodeTables& t) {
  l.pos += consumed_bits(l.buf);
  const uint64_t buf = load_bits(data, l.pos);
  uint32_t sym = 0;
  const int len = long_lookup(t, static_cast<uint32_t>(buf >> (64 - kL)), &sym);
  if (len == 0) return false;
  *l.out++ = static_cast<T>(sym);
  l.pos += static_cast<uint64_t>(len);
  l.buf = uint64_t{0x40};  // consumed_bits == 0 until the next reload
  return true;
}

// The lock-step loop's group end when some lane stalled on a long code: every lane decodes a long
// code without branches and keeps it only if it stalled (one unpredictable branch per such group
// instead of one per lane plus the length walk's). The load and the one-symbol store stay inside
// the bounds of safe_groups for any lane, stalled or not.
template <typename T>
PYSERVE_INLINE bool long_step(Lane<T>& l, uint64_t last_entry, const uint8_t* data, const DecodeTables& t) {
  l.pos += consumed_bits(l.buf);
  const uint64_t buf = load_bits(data, l.pos);
  uint32_t sym = 0;
  const int len = long_lookup(t, static_cast<uint32_t>(buf >> (64 - kL)), &sym);
  const uint64_t take = (last_entry & kLongCode) >> 7;
  *l.out = static_cast<T>(sym);
  l.out += take;
  l.pos += take * static_cast<uint64_t>(len);
  return !(take & (len == 0));
}

template <typename T>
PYSERVE_INLINE bool end_group(Lane<T>& l, uint64_t last_entry, const uint8_t* data, const DecodeTables& t) {
  if (PYSERVE_UNLIKELY(last_entry & kLongCode)) return long_code(l, data, t);
  l.pos += consumed_bits(l.buf);
  return true;
}

// Safe peek of the 32 bits starting at bit `pos`; bytes at or past nbytes read as zero.
inline uint32_t peek32(const uint8_t* d, uint64_t nbytes, uint64_t pos) {
  const uint64_t byte = pos >> 3;
  uint64_t v = 0;
  for (uint64_t i = 0; i < 5; ++i) {
    v <<= 8;
    if (byte + i < nbytes) v |= d[byte + i];
  }
  return static_cast<uint32_t>(((v << (pos & 7)) >> 8) & 0xffffffffu);
}

std::string invalid_code_message(int stream) {
  return str_cat("bitstream ", stream, " contains a bit pattern that is no code of the table (corrupt stream)");
}

// Decodes what the lock-step loop left of one bitstream: a single-lane fast loop, then a
// bounds-checked tail; finally checks that exactly `bits` bits were used.
template <typename T>
PYSERVE_INLINE bool finish_stream(Lane<T> l, const LaneBounds<T>& b, const uint8_t* data, uint64_t offset, uint64_t bits,
                   uint64_t count, const DecodeTables& t, int index, std::string* error) {
  for (std::ptrdiff_t groups; (groups = safe_groups(l, b)) > 0;) {
    bool ok = true;
    for (std::ptrdiff_t i = 0; i < groups; ++i) {
      l.buf = load_bits(data, l.pos);
      uint64_t e = 0;
      for (int k = 0; k < kGroup; ++k) e = step(l, t);
      ok &= end_group(l, e, data, t);
    }
    if (!ok) {
      *error = invalid_code_message(index);
      return false;
    }
  }
  const uint8_t* start = data + offset;
  const uint64_t nbytes = b.end_byte - offset;
  uint64_t pos = l.pos - 8 * offset;
  T* out = l.out;
  while (out < b.out_end) {
    if (pos > bits) break;
    const uint32_t v = peek32(start, nbytes, pos);
    const uint32_t e = t.single[v >> (32 - kK)];
    uint32_t sym = e >> 8;
    int len = static_cast<int>(e & 0xff);
    if (len == 0) {
      len = long_lookup(t, v >> (32 - kL), &sym);
      if (len == 0) {
        *error = invalid_code_message(index);
        return false;
      }
    }
    pos += static_cast<uint64_t>(len);
    *out++ = static_cast<T>(sym);
  }
  if (pos > bits) {
    *error = str_cat("bitstream ", index, ": its ", count, " symbols need more than the ", bits,
                     " bits recorded for it (corrupt stream)");
    return false;
  }
  if (pos < bits) {
    *error = str_cat("bitstream ", index, ": its ", count, " symbols end at bit ", pos, " of the ", bits,
                     " bits recorded for it (corrupt stream)");
    return false;
  }
  return true;
}

// Decodes N lanes in lock step while every lane has room for whole groups; returns false on a bit
// pattern that is no code. The lanes are copied into locals so that they live in registers.
template <typename T, int N>
PYSERVE_INLINE bool lock_step(Lane<T>* lanes, const LaneBounds<T>* b, const uint8_t* data, const DecodeTables& t) {
  Lane<T> l[N];
  for (int j = 0; j < N; ++j) l[j] = lanes[j];
  bool ok = true;
  for (;;) {
    std::ptrdiff_t groups = safe_groups(l[0], b[0]);
    for (int j = 1; j < N; ++j) groups = std::min(groups, safe_groups(l[j], b[j]));
    if (groups == 0 || !ok) break;
    for (std::ptrdiff_t i = 0; i < groups; ++i) {
      uint64_t e[N];
      for (int j = 0; j < N; ++j) l[j].buf = load_bits(data, l[j].pos);
      for (int k = 0; k < kGroup; ++k)
        for (int j = 0; j < N; ++j) e[j] = step(l[j], t);
      uint64_t any = 0;
      for (int j = 0; j < N; ++j) any |= e[j];
      if (PYSERVE_LIKELY(!(any & kLongCode))) {
        for (int j = 0; j < N; ++j) l[j].pos += consumed_bits(l[j].buf);
      } else {
        for (int j = 0; j < N; ++j) ok &= long_step(l[j], e[j], data, t);
      }
    }
  }
  for (int j = 0; j < N; ++j) lanes[j] = l[j];
  return ok;
}

// Decodes bitstreams / chunks [s0, s1) of the stream.
template <typename T>
PYSERVE_INLINE bool decode_range(const uint8_t* data, const StreamInfo& info, const DecodeTables& t, T* out, int s0,
                                 int s1, std::string* error) {
  const int S = s1 - s0;
  std::vector<Lane<T>> lanes(static_cast<std::size_t>(S));
  std::vector<LaneBounds<T>> bounds(static_cast<std::size_t>(S));
  for (int i = 0; i < S; ++i) {
    const int s = s0 + i;
    const uint64_t begin = info.stream_begin[s], count = info.stream_count[s];
    lanes[i] = Lane<T>{8 * info.stream_offset[s], 0, out + begin};
    bounds[i] = LaneBounds<T>{info.stream_offset[s] + (info.stream_bits[s] + 7) / 8, out + begin + count};
  }
  // Bitstreams in lock step, kLanes at a time: independent dependency chains overlap in the CPU.
  for (int g = 0; g + kLanes <= S; g += kLanes)
    if (!lock_step<T, kLanes>(&lanes[g], &bounds[g], data, t)) {
      *error = str_cat("a bitstream among ", s0 + g, "..", s0 + g + kLanes - 1,
                       " contains a bit pattern that is no code of the table (corrupt stream)");
      return false;
    }
  for (int i = 0; i < S; ++i) {
    const int s = s0 + i;
    if (!finish_stream(lanes[i], bounds[i], data, info.stream_offset[s], info.stream_bits[s], info.stream_count[s], t,
                       s, error))
      return false;
  }
  return true;
}

// Version 1: all bitstreams as one range. Version 2: blocks of kBlockChunks chunks, spread over
// `threads` OpenMP threads; the error reported is the first failing block's, whatever the thread
// count, so messages do not depend on it.
constexpr int kBlockChunks = 16;

template <typename T>
PYSERVE_INLINE bool decode_typed(const uint8_t* data, const StreamInfo& info, const DecodeTables& t, T* out,
                                 int threads, std::string* error) {
  const int S = info.num_streams;
  if (info.version != kFormatVersionChunked || S <= kBlockChunks) return decode_range(data, info, t, out, 0, S, error);
  const int blocks = S / kBlockChunks + (S % kBlockChunks != 0);
  std::vector<std::string> errors(static_cast<std::size_t>(blocks));
  std::atomic<int> first_bad{blocks};
  // More threads than the machine has only adds thread creation (and a process limit on threads
  // would make the OpenMP runtime abort): capped at the hardware threads.
  const int hardware = static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(1, std::min({threads, blocks, hardware > 0 ? hardware : 1}));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int b = 0; b < blocks; ++b) {
    if (b > first_bad.load(std::memory_order_relaxed)) continue;  // a lower block already failed
    const int s0 = b * kBlockChunks, s1 = std::min(S, s0 + kBlockChunks);
    if (!decode_range(data, info, t, out, s0, s1, &errors[b])) {
      int cur = first_bad.load();
      while (b < cur && !first_bad.compare_exchange_weak(cur, b)) {
      }
    }
  }
  const int bad = first_bad.load();
  if (bad < blocks) {
    *error = errors[bad];
    return false;
  }
  return true;
}

// The decoder compiled twice from the same source: once for any x86-64 (or other) CPU and once
// with BMI2, whose shlx/shrx shift by a count in any register (the portable build funnels every
// variable shift through %cl, one extra move per table lookup and fewer free registers for the
// four lanes). Chosen at run time, like the AVX2 kernels.
template <typename T>
PYSERVE_NOINLINE bool decode_generic(const uint8_t* data, const StreamInfo& info, const DecodeTables& t, T* out,
                                     int threads, std::string* error) {
  return decode_typed(data, info, t, out, threads, error);
}

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define PYSERVE_HUFFMAN_BMI2 1
template <typename T>
__attribute__((target("bmi,bmi2"))) PYSERVE_NOINLINE bool decode_bmi2(const uint8_t* data, const StreamInfo& info,
                                                                      const DecodeTables& t, T* out, int threads,
                                                                      std::string* error) {
  return decode_typed(data, info, t, out, threads, error);
}

bool cpu_has_bmi2() {
  static const bool has = __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  return has;
}
#endif

template <typename T>
bool decode_dispatch(const uint8_t* data, const StreamInfo& info, const DecodeTables& t, T* out, int threads,
                     std::string* error) {
#ifdef PYSERVE_HUFFMAN_BMI2
  if (cpu_has_bmi2() && !std::getenv("PYSERVE_HUFFMAN_NO_BMI2")) return decode_bmi2(data, info, t, out, threads, error);
#endif
  return decode_generic(data, info, t, out, threads, error);
}

}  // namespace

// ---- code lengths -------------------------------------------------------------------------------
void package_merge_lengths(const uint64_t* weights, int m, int limit, uint8_t* lengths_out) {
  PYSERVE_CHECK_INTERNAL(m >= 2 && limit >= 1 && limit <= kMaxCodeLength && (uint64_t{1} << limit) >= uint64_t(m), kOp,
                         "package_merge_lengths(m=", m, ", limit=", limit, ")");
  // Level `limit` (deepest) holds the leaves; level d < limit merges the leaves with the pairwise
  // packages of level d+1. Only the first 2m-2 items of any level can ever be selected.
  const std::size_t cap = 2 * static_cast<std::size_t>(m) - 2;
  std::vector<uint8_t> is_leaf(static_cast<std::size_t>(limit) * cap, 1);  // row d-1: level d
  std::vector<uint64_t> prev(weights, weights + std::min<std::size_t>(cap, m));
  std::vector<uint64_t> cur;
  cur.reserve(cap);
  for (int d = limit - 1; d >= 1; --d) {
    cur.clear();
    uint8_t* flags = &is_leaf[static_cast<std::size_t>(d - 1) * cap];
    const std::size_t npk = prev.size() / 2;
    std::size_t i = 0, j = 0;
    while (cur.size() < cap && (i < static_cast<std::size_t>(m) || j < npk)) {
      const bool take_leaf = j >= npk || (i < static_cast<std::size_t>(m) && weights[i] <= prev[2 * j] + prev[2 * j + 1]);
      flags[cur.size()] = take_leaf ? 1 : 0;
      if (take_leaf) {
        cur.push_back(weights[i++]);
      } else {
        cur.push_back(prev[2 * j] + prev[2 * j + 1]);
        ++j;
      }
    }
    prev.swap(cur);
  }
  std::fill(lengths_out, lengths_out + m, 0);
  std::size_t take = cap;  // items selected at the current level
  for (int d = 1; d <= limit && take > 0; ++d) {
    const uint8_t* flags = &is_leaf[static_cast<std::size_t>(d - 1) * cap];
    std::size_t leaves = 0;
    for (std::size_t k = 0; k < take; ++k) leaves += flags[k];
    PYSERVE_CHECK_INTERNAL(leaves <= static_cast<std::size_t>(m), kOp, "package-merge selected ", leaves, " leaves of ", m);
    for (std::size_t k = 0; k < leaves; ++k) ++lengths_out[k];
    take = 2 * (take - leaves);
  }
  // Verify the Kraft equality; a failure here is a bug, never bad input.
  uint64_t kraft = 0;
  for (int k = 0; k < m; ++k) {
    PYSERVE_CHECK_INTERNAL(lengths_out[k] >= 1 && lengths_out[k] <= limit, kOp, "length ", int(lengths_out[k]));
    kraft += uint64_t{1} << (limit - lengths_out[k]);
  }
  PYSERVE_CHECK_INTERNAL(kraft == (uint64_t{1} << limit), kOp, "Kraft sum ", kraft, " != ", (uint64_t{1} << limit));
}

bool canonical_codes(const uint8_t* lengths, int n, uint32_t* codes_out) {
  uint32_t bl_count[kL + 2] = {0};
  for (int s = 0; s < n; ++s) {
    if (lengths[s] > kL) return false;
    if (lengths[s]) ++bl_count[lengths[s]];
  }
  uint32_t next_code[kL + 2] = {0};
  uint64_t code = 0;
  for (int bits = 1; bits <= kL; ++bits) {
    code = (code + bl_count[bits - 1]) << 1;
    next_code[bits] = static_cast<uint32_t>(code);
    if (code + bl_count[bits] > (uint64_t{1} << bits)) return false;  // oversubscribed
  }
  for (int s = 0; s < n; ++s) codes_out[s] = lengths[s] ? next_code[lengths[s]]++ : 0;
  return true;
}

// ---- encoding -----------------------------------------------------------------------------------
void plan_encode(const void* symbols, uint64_t count, SymbolType type, EncodePlan* plan, uint64_t chunk_symbols) {
  PYSERVE_CHECK_INTERNAL(chunk_symbols <= kMaxChunkSymbols, kOp, "chunk_symbols ", chunk_symbols);
  plan->type = type;
  plan->count = count;
  plan->chunk_symbols = chunk_symbols;
  plan->lo = 0;
  plan->lengths.clear();
  plan->codes.clear();
  plan->stream_bits.clear();
  plan->table_mode = 0;
  plan->table_entries = 0;
  plan->first_symbol = 0;
  if (count == 0) {
    plan->num_streams = 0;
    plan->total_bytes = kHeaderBytes;
    return;
  }
  const auto* s8 = static_cast<const uint8_t*>(symbols);
  const auto* s16 = static_cast<const uint16_t*>(symbols);
  uint32_t lo = 0, hi = 0;
  if (type == SymbolType::kUint8)
    min_max(s8, count, &lo, &hi);
  else
    min_max(s16, count, &lo, &hi);
  // Every per-symbol array covers only [lo, hi]: small streams of wide dtypes stay cheap.
  const uint32_t R = hi - lo + 1;
  // Version 2 counts the whole stream once (one histogram row) and each chunk's bits afterwards.
  const int S = chunk_symbols ? 1 : count >= kMultiStreamThreshold ? kEncoderStreams : 1;
  plan->num_streams = S;
  plan->lo = lo;
  // Rows 0..S-1: per-bitstream histograms; with S > 1 row S holds the total.
  std::vector<uint64_t> hist(static_cast<std::size_t>(S == 1 ? 1 : S + 1) * R, 0);
  for (int s = 0; s < S; ++s) {
    uint64_t begin = 0, n = 0;
    stream_range(count, S, s, &begin, &n);
    uint64_t* row = &hist[static_cast<std::size_t>(s) * R];
    if (type == SymbolType::kUint8)
      histogram_u8(s8 + begin, n, lo, R, row);
    else
      histogram_u16(s16 + begin, n, lo, R, row);
  }
  uint64_t* total = &hist[static_cast<std::size_t>(S == 1 ? 0 : S) * R];
  if (S > 1)
    for (int s = 0; s < S; ++s)
      for (uint32_t i = 0; i < R; ++i) total[i] += hist[static_cast<std::size_t>(s) * R + i];
  std::vector<uint32_t> present;  // indices into [0, R)
  for (uint32_t i = 0; i < R; ++i)
    if (total[i]) present.push_back(i);
  const int m = static_cast<int>(present.size());
  plan->lengths.assign(R, 0);
  plan->codes.assign(R, 0);
  if (m == 1) {
    plan->lengths[present[0]] = 1;
  } else {
    std::vector<uint32_t> order(present);
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return total[a] < total[b]; });
    std::vector<uint64_t> w(m);
    for (int k = 0; k < m; ++k) w[k] = total[order[k]];
    std::vector<uint8_t> len(m);
    package_merge_lengths(w.data(), m, kMaxCodeLength, len.data());
    for (int k = 0; k < m; ++k) plan->lengths[order[k]] = len[k];
  }
  PYSERVE_CHECK_INTERNAL(canonical_codes(plan->lengths.data(), static_cast<int>(R), plan->codes.data()), kOp,
                         "code assignment");

  std::size_t payload = 0;
  std::size_t sizes_bytes = 0;
  if (chunk_symbols) {
    const uint64_t chunks = count / chunk_symbols + (count % chunk_symbols != 0);
    PYSERVE_CHECK_INTERNAL(chunks < (uint64_t{1} << 31), kOp, "too many chunks: ", chunks);
    plan->num_streams = static_cast<int>(chunks);
    plan->stream_bits.assign(chunks, 0);
    const uint8_t* len = plan->lengths.data();
    for (uint64_t c = 0; c < chunks; ++c) {
      uint64_t b = 0, n = 0;
      chunk_range(count, chunk_symbols, c, &b, &n);
      const uint64_t e = b + n;
      uint64_t bits = 0;
      if (type == SymbolType::kUint8)
        for (uint64_t i = b; i < e; ++i) bits += len[s8[i] - lo];
      else
        for (uint64_t i = b; i < e; ++i) bits += len[s16[i] - lo];
      plan->stream_bits[c] = bits;
      payload += static_cast<std::size_t>((bits + 7) / 8);
    }
    sizes_bytes = 4 + 4 * static_cast<std::size_t>(chunks);
  } else {
    plan->stream_bits.assign(S, 0);
    for (int s = 0; s < S; ++s) {
      uint64_t bits = 0;
      for (uint32_t i : present) bits += hist[static_cast<std::size_t>(s) * R + i] * plan->lengths[i];
      plan->stream_bits[s] = bits;
      payload += static_cast<std::size_t>((bits + 7) / 8);
    }
    sizes_bytes = 8 * static_cast<std::size_t>(S);
  }
  // lo and hi are both present, so the dense range is exactly [lo, hi].
  const std::size_t dense = R;
  const std::size_t sparse = 3 * static_cast<std::size_t>(m);
  std::size_t table_bytes;
  if (dense <= sparse) {
    plan->table_mode = 0;
    plan->table_entries = R;
    plan->first_symbol = static_cast<uint16_t>(lo);
    table_bytes = dense;
  } else {
    plan->table_mode = 1;
    plan->table_entries = static_cast<uint32_t>(m);
    plan->first_symbol = 0;
    table_bytes = sparse;
  }
  plan->total_bytes = kHeaderBytes + table_bytes + sizes_bytes + payload;
}

bool write_encoded(const void* symbols, const EncodePlan& plan, uint8_t* out, std::size_t out_size) {
  if (out_size < plan.total_bytes) return false;
  uint8_t* const buf_end = out + plan.total_bytes;
  std::memcpy(out, kMagic, 4);
  const bool chunked = plan.chunk_symbols != 0;
  out[4] = chunked ? kFormatVersionChunked : kFormatVersion;
  out[5] = static_cast<uint8_t>(plan.type);
  out[6] = chunked ? 0 : static_cast<uint8_t>(plan.num_streams);
  out[7] = static_cast<uint8_t>(plan.table_mode);
  write_le(out + 8, plan.count, 8);
  write_le(out + 16, plan.table_entries, 4);
  write_le(out + 20, plan.first_symbol, 2);
  uint8_t* p = out + kHeaderBytes;
  if (plan.count == 0) return true;
  const uint32_t R = static_cast<uint32_t>(plan.lengths.size());
  if (plan.table_mode == 0) {
    std::memcpy(p, plan.lengths.data(), R);
    p += R;
  } else {
    for (uint32_t i = 0; i < R; ++i) {
      if (!plan.lengths[i]) continue;
      write_le(p, static_cast<uint64_t>(plan.lo + i), 2);
      p[2] = plan.lengths[i];
      p += 3;
    }
  }
  if (chunked) {
    write_le(p, plan.chunk_symbols, 4);
    p += 4;
  }
  for (int s = 0; s < plan.num_streams; ++s) {
    write_le(p, plan.stream_bits[s], chunked ? 4 : 8);
    p += chunked ? 4 : 8;
  }
  uint32_t tab_size = 1;
  while (tab_size < R) tab_size <<= 1;
  std::vector<uint32_t> tab(tab_size, 0u);
  int max_len = 0;
  for (uint32_t i = 0; i < R; ++i) {
    tab[i] = (plan.codes[i] << 8) | plan.lengths[i];
    max_len = std::max<int>(max_len, plan.lengths[i]);
  }
  const uint64_t chunk = chunked ? plan.chunk_symbols : stream_chunk(plan.count, plan.num_streams);
  for (int s = 0; s < plan.num_streams; ++s) {
    uint64_t begin = 0, n = 0;
    chunk_range(plan.count, chunk, static_cast<uint64_t>(s), &begin, &n);
    uint8_t* stream_end;
    if (plan.type == SymbolType::kUint8)
      stream_end = encode_chunk_dispatch(static_cast<const uint8_t*>(symbols) + begin, n, plan.lo, tab_size - 1,
                                         tab.data(), max_len, p, buf_end);
    else
      stream_end = encode_chunk_dispatch(static_cast<const uint16_t*>(symbols) + begin, n, plan.lo, tab_size - 1,
                                         tab.data(), max_len, p, buf_end);
    const uint8_t* expected = p + (plan.stream_bits[s] + 7) / 8;
    PYSERVE_CHECK_INTERNAL(stream_end == expected, kOp, "bitstream ", s, " wrote ", stream_end - p, " bytes, planned ",
                           expected - p);
    p = stream_end;
  }
  PYSERVE_CHECK_INTERNAL(p == buf_end, kOp, "wrote ", p - out, " bytes, planned ", plan.total_bytes);
  return true;
}

// ---- decoding -----------------------------------------------------------------------------------
bool parse_stream(const uint8_t* data, std::size_t size, StreamInfo* info, std::string* error) {
  auto fail = [&](const std::string& msg) {
    *error = msg;
    return false;
  };
  if (size < kHeaderBytes)
    return fail(str_cat("truncated stream: ", size, " bytes, but the header alone takes ", kHeaderBytes));
  if (std::memcmp(data, kMagic, 4) != 0) return fail("bad magic: not a pyserve Huffman stream (expected \"PSHF\")");
  if (data[4] != kFormatVersion && data[4] != kFormatVersionChunked)
    return fail(str_cat("unsupported format version ", int(data[4]), " (this build reads versions ", int(kFormatVersion),
                        " and ", int(kFormatVersionChunked), ")"));
  const int version = data[4];
  if (data[5] != 1 && data[5] != 2)
    return fail(str_cat("bad symbol dtype code ", int(data[5]), " (expected 1 = uint8 or 2 = uint16)"));
  const SymbolType type = static_cast<SymbolType>(data[5]);
  int S = data[6];
  const int T = data[7];
  const uint64_t N = read_le(data + 8, 8);
  const uint64_t A = read_le(data + 16, 4);
  const uint64_t F = read_le(data + 20, 2);
  const int alphabet = alphabet_size(type);
  info->type = type;
  info->version = version;
  info->count = N;
  info->chunk_symbols = 0;
  info->num_streams = 0;
  info->first_symbol = 0;
  info->lengths.clear();
  info->stream_bits.clear();
  info->stream_offset.clear();
  info->stream_count.clear();
  info->stream_begin.clear();
  if (N == 0) {
    if (S != 0 || T != 0 || A != 0 || F != 0)
      return fail(str_cat("inconsistent header: symbol count 0 needs 0 bitstreams and an empty table, got ", S,
                          " bitstreams, table mode ", T, ", ", A, " table entries, first symbol ", F));
    if (size != kHeaderBytes)
      return fail(str_cat("trailing data: an empty stream is ", kHeaderBytes, " bytes, got ", size));
    return true;
  }
  if (version == kFormatVersionChunked) {
    if (S != 0) return fail(str_cat("bad bitstream count field ", S, " (version 2 streams store 0 there)"));
  } else if (S < 1 || S > kMaxStreams) {
    return fail(str_cat("bad bitstream count ", S, " (expected 1..", kMaxStreams, ")"));
  }
  // Every symbol takes at least one bit: a cheap bound before any arithmetic on N.
  if (N / 8 > size) return fail(str_cat("symbol count ", N, " cannot fit in a stream of ", size, " bytes"));
  if (T != 0 && T != 1) return fail(str_cat("bad code-length table mode ", T, " (expected 0 = dense, 1 = sparse)"));
  if (A < 1 || A > static_cast<uint64_t>(alphabet))
    return fail(str_cat("bad code-length table size ", A, " (expected 1..", alphabet, ")"));
  std::size_t pos = kHeaderBytes;
  if (T == 0) {
    if (F + A > static_cast<uint64_t>(alphabet))
      return fail(str_cat("code-length table covers symbols ", F, "..", F + A - 1, ", beyond the dtype's ", alphabet));
    if (size - pos < A)
      return fail(str_cat("truncated code-length table: needs ", A, " bytes, ", size - pos, " remain"));
    info->first_symbol = static_cast<uint32_t>(F);
    info->lengths.assign(data + pos, data + pos + A);
    for (uint64_t i = 0; i < A; ++i)
      if (info->lengths[i] > kMaxCodeLength)
        return fail(str_cat("code length ", int(info->lengths[i]), " of symbol ", F + i, " exceeds the maximum ",
                            kMaxCodeLength));
    pos += A;
  } else {
    if (F != 0) return fail(str_cat("sparse code-length table must have first symbol 0, got ", F));
    if ((size - pos) / 3 < A)
      return fail(str_cat("truncated code-length table: needs ", 3 * A, " bytes, ", size - pos, " remain"));
    const uint8_t* entry = data + pos;
    int64_t last = -1;
    for (uint64_t i = 0; i < A; ++i) {
      const uint64_t sym = read_le(entry + 3 * i, 2);
      const uint8_t len = entry[3 * i + 2];
      if (static_cast<int64_t>(sym) <= last)
        return fail(str_cat("sparse code-length table: symbols not strictly increasing at entry ", i));
      if (sym >= static_cast<uint64_t>(alphabet))
        return fail(str_cat("sparse code-length table: symbol ", sym, " out of range for the dtype"));
      if (len < 1 || len > kMaxCodeLength)
        return fail(str_cat("code length ", int(len), " of symbol ", sym, " outside 1..", kMaxCodeLength));
      last = static_cast<int64_t>(sym);
    }
    const uint64_t first = read_le(entry, 2);
    info->first_symbol = static_cast<uint32_t>(first);
    info->lengths.assign(static_cast<std::size_t>(last) - first + 1, 0);
    for (uint64_t i = 0; i < A; ++i) info->lengths[read_le(entry + 3 * i, 2) - first] = entry[3 * i + 2];
    pos += 3 * A;
  }
  // Kraft: a complete code (sum 2^-len == 1), or one symbol of length 1.
  int present = 0;
  int min_len = kMaxCodeLength + 1, max_len = 0;
  uint64_t kraft = 0;
  for (const uint8_t len8 : info->lengths) {
    const int len = len8;
    if (!len) continue;
    ++present;
    min_len = std::min(min_len, len);
    max_len = std::max(max_len, len);
    kraft += uint64_t{1} << (kMaxCodeLength - len);
  }
  if (present == 0) return fail("code-length table has no symbol with a code");
  if (present == 1 && max_len != 1)
    return fail(str_cat("a single-symbol code must have length 1, got ", max_len));
  if (present >= 2 && kraft != (uint64_t{1} << kMaxCodeLength))
    return fail(str_cat("code lengths violate the Kraft equality: sum 2^-len = ", kraft, "/", (uint64_t{1} << kMaxCodeLength),
                        kraft > (uint64_t{1} << kMaxCodeLength) ? " > 1 (oversubscribed)" : " < 1 (incomplete)"));
  uint64_t C;  // symbols per bitstream (the last may hold fewer)
  int width;   // bytes per stored bit length
  if (version == kFormatVersionChunked) {
    if (size - pos < 4) return fail(str_cat("truncated stream: the chunk size needs 4 bytes, ", size - pos, " remain"));
    C = read_le(data + pos, 4);
    pos += 4;
    if (C < 1 || C > kMaxChunkSymbols)
      return fail(str_cat("bad chunk size ", C, " symbols (expected 1..", kMaxChunkSymbols, ")"));
    const uint64_t chunks = N / C + (N % C != 0);
    if ((size - pos) / 4 < chunks)
      return fail(str_cat("truncated stream: ", chunks, " chunk sizes need ", 4 * chunks, " bytes, ", size - pos,
                          " remain"));
    // chunks <= (size - pos) / 4: below 2^31 for any buffer under 8 GiB; checked for larger ones.
    if (chunks >= (uint64_t{1} << 31)) return fail(str_cat("too many chunks: ", chunks));
    S = static_cast<int>(chunks);
    width = 4;
  } else {
    if ((size - pos) / 8 < static_cast<std::size_t>(S))
      return fail(str_cat("truncated stream: ", S, " bitstream sizes need ", 8 * S, " bytes, ", size - pos, " remain"));
    C = stream_chunk(N, S);
    width = 8;
  }
  const uint8_t* sizes = data + pos;
  const std::size_t payload = pos + static_cast<std::size_t>(width) * static_cast<std::size_t>(S);
  // Two passes over the bitstream sizes: the first checks every one (and allocates nothing, so a
  // hostile stream is refused at no memory cost), the second fills the per-bitstream tables.
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) {
      info->chunk_symbols = C;
      info->num_streams = S;
      info->stream_bits.resize(S);
      info->stream_offset.resize(S);
      info->stream_count.resize(S);
      info->stream_begin.resize(S);
    }
    pos = payload;
    for (int s = 0; s < S; ++s) {
      const uint64_t bits = read_le(sizes + static_cast<std::size_t>(width) * static_cast<std::size_t>(s), width);
      uint64_t begin = 0, n = 0;
      chunk_range(N, C, static_cast<uint64_t>(s), &begin, &n);
      const uint64_t nbytes = (bits + 7) / 8;
      if (pass == 0) {
        const uint64_t remain = size - pos;
        if (bits / 8 > remain || nbytes > remain)
          return fail(str_cat("truncated stream: bitstream ", s, " has ", bits, " bits but only ", remain, " bytes remain"));
        if (bits % 8) {
          const uint8_t pad_mask = static_cast<uint8_t>((1u << (8 - bits % 8)) - 1);
          if (data[pos + nbytes - 1] & pad_mask) return fail(str_cat("bitstream ", s, " has nonzero padding bits"));
        }
        // n <= N <= 8 * size here, so n * max_len cannot overflow.
        if (bits < n * static_cast<uint64_t>(min_len) || bits > n * static_cast<uint64_t>(max_len))
          return fail(str_cat("bitstream ", s, ": ", bits, " bits cannot hold its ", n, " symbols with codes of ",
                              min_len, "..", max_len, " bits"));
      } else {
        info->stream_bits[s] = bits;
        info->stream_offset[s] = pos;
        info->stream_count[s] = n;
        info->stream_begin[s] = begin;
      }
      pos += nbytes;
    }
    if (pos != size) return fail(str_cat("trailing data: the stream ends at byte ", pos, " but the buffer has ", size));
  }
  return true;
}

void build_canonical_tables(const StreamInfo& info, CanonicalTables* out) {
  auto t = std::make_unique<DecodeTables>();
  build_tables(info.lengths, info.first_symbol, symbol_bytes(info.type), t.get());
  out->single.assign(t->single.begin(), t->single.end());
  out->multi.assign(t->multi.begin(), t->multi.end());
  std::copy(std::begin(t->first_code), std::end(t->first_code), std::begin(out->first_code));
  std::copy(std::begin(t->count), std::end(t->count), std::begin(out->count));
  std::copy(std::begin(t->offset), std::end(t->offset), std::begin(out->offset));
  out->sorted = t->sorted;
  out->max_len = t->max_len;
}

bool decode_symbols(const uint8_t* data, std::size_t size, const StreamInfo& info, void* out, std::string* error,
                    int threads) {
  (void)size;  // parse_stream already bounded every bitstream by `size`
  if (info.count == 0) return true;
  auto tables = std::make_unique<DecodeTables>();
  build_tables(info.lengths, info.first_symbol, symbol_bytes(info.type), tables.get());
  if (info.type == SymbolType::kUint8)
    return decode_dispatch(data, info, *tables, static_cast<uint8_t*>(out), threads, error);
  return decode_dispatch(data, info, *tables, static_cast<uint16_t*>(out), threads, error);
}

}  // namespace huffman
}  // namespace pyserve
