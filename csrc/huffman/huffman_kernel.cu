// CUDA Huffman decoding: one thread per independently decodable chunk (format version 2, or the
// bitstreams of version 1), with the canonical tables in shared memory. Layout: huffman_kernel.h.
//
// Each thread reads its chunk into a 64-bit register buffer, one byte-swapped 32-bit word at a time
// (bitstreams are MSB-first) whenever fewer than 32 bits remain in it, and writes its symbols four
// bytes at a time; codes of up to kTableBits bits resolve with one shared-memory lookup, longer ones by the
// canonical first-code test per length (Moffat & Turpin, "On the implementation of minimum
// redundancy prefix codes", IEEE Trans. Commun. 1997). A chunk must decode to exactly its symbol
// count in exactly its bit length; the first offending chunk is recorded and reported to the host.
#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "common/cuda_check.cuh"
#include "huffman/huffman_kernel_cuda.h"

namespace pyserve {
namespace huffman {

namespace {

constexpr int kThreads = 128;
constexpr int kTable = 1 << kTableBits;
constexpr int kLens = kMaxCodeLength + 2;
constexpr unsigned long long kNoBad = ~0ull;

struct Chunk {
  unsigned long long bit0;   // absolute bit offset of the chunk in the buffer
  unsigned long long bits;   // its bit length
  unsigned long long begin;  // index of its first symbol
  unsigned long long count;  // its symbol count
};

__device__ __forceinline__ uint32_t load_be32(const uint32_t* words, unsigned long long i) {
  return __byte_perm(__ldg(words + i), 0, 0x0123);
}

// Decodes one symbol from the bit buffer (MSB-aligned, at least 32 valid bits). Returns its length,
// 0 for a bit pattern that is no code.
__device__ __forceinline__ uint32_t decode_one(uint64_t buf, const uint32_t* single, const uint32_t* first_code,
                                               const uint32_t* count, const uint32_t* offset,
                                               const uint16_t* __restrict__ sorted, int max_len, uint32_t* sym) {
  const uint32_t window = static_cast<uint32_t>(buf >> 32);
  const uint32_t e = single[window >> (32 - kTableBits)];
  *sym = e >> 8;
  if (e & 0xffu) return e & 0xffu;
  for (int l = kTableBits + 1; l <= max_len; ++l) {
    const uint32_t d = (window >> (32 - l)) - first_code[l];
    if (d < count[l]) {
      *sym = sorted[offset[l] + d];
      return static_cast<uint32_t>(l);
    }
  }
  return 0;  // no code (only possible with the lone-symbol code "0")
}

template <typename T>
__global__ void decode_kernel(const uint32_t* __restrict__ words, const Chunk* __restrict__ chunks, long long num_chunks,
                              const uint32_t* __restrict__ table, const uint64_t* __restrict__ multi_table,
                              const uint32_t* __restrict__ canon,
                              const uint16_t* __restrict__ sorted, int max_len, T* __restrict__ out,
                              unsigned long long* __restrict__ first_bad) {
  __shared__ uint32_t single[kTable];
  __shared__ uint64_t multi[kTable];
  __shared__ uint32_t first_code[kLens], count[kLens], offset[kLens];
  for (int i = threadIdx.x; i < kTable; i += blockDim.x) {
    single[i] = table[i];
    multi[i] = multi_table[i];
  }
  for (int i = threadIdx.x; i < kLens; i += blockDim.x) {
    first_code[i] = canon[i];
    count[i] = canon[kLens + i];
    offset[i] = canon[2 * kLens + i];
  }
  __syncthreads();
  const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= num_chunks) return;
  const Chunk ch = chunks[c];
  // Bits consumed so far count up to `bits`; the buffer holds the next `avail` bits, MSB-aligned,
  // refilled one 32-bit word at a time. Reads stay within the chunk plus 8 bytes, and the buffer
  // has 32 zero bytes past the stream.
  const unsigned long long bits = ch.bits;
  unsigned long long used = 0;
  unsigned long long w = ch.bit0 >> 5;
  const uint32_t skip = static_cast<uint32_t>(ch.bit0 & 31);
  uint64_t buf = ((static_cast<uint64_t>(load_be32(words, w)) << 32) | load_be32(words, w + 1)) << skip;
  uint32_t avail = 64 - skip;
  w += 2;
  T* o = out + ch.begin;
  const unsigned long long n = ch.count;
  // Packed stores (4 bytes at a time) when this chunk's output is 4-byte aligned.
  constexpr unsigned kPer = 4 / sizeof(T);
  const bool packed = (reinterpret_cast<uintptr_t>(o) & 3u) == 0;
  uint32_t acc = 0;
  unsigned long long i = 0;
  auto emit = [&](uint32_t sym) {
    if (packed) {
      const unsigned slot = static_cast<unsigned>(i % kPer);
      acc |= sym << (8 * sizeof(T) * slot);
      if (slot == kPer - 1) {
        *reinterpret_cast<uint32_t*>(o + (i - slot)) = acc;
        acc = 0;
      }
    } else {
      o[i] = static_cast<T>(sym);
    }
    ++i;
  };
  auto refill = [&]() {
    if (avail < 32) {
      buf |= static_cast<uint64_t>(load_be32(words, w)) << (32 - avail);
      avail += 32;
      ++w;
    }
  };
  bool bad = false;
  // Whole multi-symbol lookups (the host decoder's table: up to 6 uint8 or 3 uint16 codes that fit
  // in kTableBits bits per lookup) while that many symbols remain, so no lookup overshoots the chunk.
  constexpr unsigned kMaxSyms = sizeof(T) == 1 ? 6 : 3;
  constexpr uint32_t kSymMask = sizeof(T) == 1 ? 0xffu : 0xffffu;
  while (n - i >= kMaxSyms) {
    refill();
    const uint64_t e = multi[buf >> (64 - kTableBits)];
    const uint32_t k = static_cast<uint32_t>(e >> 56);
    uint32_t len, sym = 0;
    if (k == 0) {  // the next code is longer than kTableBits bits (or is no code)
      len = decode_one(buf, single, first_code, count, offset, sorted, max_len, &sym);
      if (len == 0) {
        bad = true;
        break;
      }
    } else {
      len = static_cast<uint32_t>(e & 63u);
    }
    used += len;
    if (used > bits) {
      bad = true;
      break;
    }
    buf <<= len;
    avail -= len;
    if (k == 0) {
      emit(sym);
    } else {
      uint64_t syms = e >> 8;
      for (uint32_t j = 0; j < k; ++j) {
        emit(static_cast<uint32_t>(syms) & kSymMask);
        syms >>= 8 * sizeof(T);
      }
    }
  }
  // The last symbols one at a time.
  while (!bad && i < n) {
    refill();
    uint32_t sym;
    const uint32_t len = decode_one(buf, single, first_code, count, offset, sorted, max_len, &sym);
    used += len;
    if (len == 0 || used > bits) {
      bad = true;
      break;
    }
    buf <<= len;
    avail -= len;
    emit(sym);
  }
  if (bad || i < n || used != bits) {
    atomicMin(first_bad, static_cast<unsigned long long>(c));
    return;
  }
  if (packed)  // the last, partial word: element by element
    for (unsigned long long j = n - n % kPer; j < n; ++j)
      o[j] = static_cast<T>(acc >> (8 * sizeof(T) * (j % kPer)));
}

std::size_t round_up(std::size_t v, std::size_t m) { return (v + m - 1) / m * m; }

// The CUDA device that owns `ptr`, or -1 with *error set.
int pointer_device(const void* ptr, std::string* error) {
  cudaPointerAttributes attr{};
  if (!cuda_check(cudaPointerGetAttributes(&attr, ptr), "cudaPointerGetAttributes", error)) return -1;
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    *error = "not a CUDA device pointer";
    return -1;
  }
  return attr.device;
}

}  // namespace

bool decode_symbols_cuda(const uint8_t* data, std::size_t size, const StreamInfo& info, void* out, bool* corrupt,
                         std::string* error) {
  *corrupt = false;
  if (info.count == 0) return true;
  const int device = pointer_device(out, error);
  if (device < 0 || !cuda_check(cudaSetDevice(device), "cudaSetDevice", error)) return false;
  CanonicalTables t;
  build_canonical_tables(info, &t);
  const std::size_t S = static_cast<std::size_t>(info.num_streams);

  // One device buffer: [stream + 32 zero bytes][chunks][single][multi][canon][sorted][flag]. The stream is
  // copied straight from the caller's buffer; the rest is staged here (O(chunks + alphabet)).
  const std::size_t off_chunks = round_up(size + 32, 16);
  const std::size_t off_table = off_chunks + S * sizeof(Chunk);
  const std::size_t off_multi = off_table + kTable * sizeof(uint32_t);
  const std::size_t off_canon = off_multi + kTable * sizeof(uint64_t);
  const std::size_t off_sorted = off_canon + 3 * kLens * sizeof(uint32_t);
  const std::size_t off_flag = round_up(off_sorted + std::max<std::size_t>(t.sorted.size(), 1) * sizeof(uint16_t), 16);
  const std::size_t total = off_flag + sizeof(unsigned long long);
  std::vector<uint8_t> host(total - off_chunks, 0);
  auto* chunks = reinterpret_cast<Chunk*>(host.data());
  for (std::size_t s = 0; s < S; ++s)
    chunks[s] = Chunk{8ull * info.stream_offset[s], info.stream_bits[s], info.stream_begin[s], info.stream_count[s]};
  std::memcpy(host.data() + (off_table - off_chunks), t.single.data(), kTable * sizeof(uint32_t));
  std::memcpy(host.data() + (off_multi - off_chunks), t.multi.data(), kTable * sizeof(uint64_t));
  auto* canon = reinterpret_cast<uint32_t*>(host.data() + (off_canon - off_chunks));
  for (int l = 0; l < kLens; ++l) {
    canon[l] = t.first_code[l];
    canon[kLens + l] = t.count[l];
    canon[2 * kLens + l] = t.offset[l];
  }
  if (!t.sorted.empty())
    std::memcpy(host.data() + (off_sorted - off_chunks), t.sorted.data(), t.sorted.size() * sizeof(uint16_t));
  const unsigned long long no_bad = kNoBad;
  std::memcpy(host.data() + (off_flag - off_chunks), &no_bad, sizeof no_bad);

  // Stream-ordered allocation (no device-wide synchronisation on free); plain cudaMalloc where
  // the device has no memory pools.
  uint8_t* dev = nullptr;
  bool pooled = cudaMallocAsync(reinterpret_cast<void**>(&dev), total, 0) == cudaSuccess;
  if (!pooled) {
    (void)cudaGetLastError();
    if (!cuda_check(cudaMalloc(&dev, total), "cudaMalloc", error)) return false;
  }
  bool ok = cuda_check(cudaMemcpy(dev, data, size, cudaMemcpyHostToDevice), "cudaMemcpy (stream)", error) &&
            cuda_check(cudaMemset(dev + size, 0, off_chunks - size), "cudaMemset", error) &&
            cuda_check(cudaMemcpy(dev + off_chunks, host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy (tables)",
                  error);
  if (ok) {
    const auto* words = reinterpret_cast<const uint32_t*>(dev);
    const auto* dchunks = reinterpret_cast<const Chunk*>(dev + off_chunks);
    const auto* dtable = reinterpret_cast<const uint32_t*>(dev + off_table);
    const auto* dmulti = reinterpret_cast<const uint64_t*>(dev + off_multi);
    const auto* dcanon = reinterpret_cast<const uint32_t*>(dev + off_canon);
    const auto* dsorted = reinterpret_cast<const uint16_t*>(dev + off_sorted);
    auto* dflag = reinterpret_cast<unsigned long long*>(dev + off_flag);
    const unsigned blocks = static_cast<unsigned>((S + kThreads - 1) / kThreads);
    const long long n = static_cast<long long>(S);
    if (info.type == SymbolType::kUint8)
      decode_kernel<uint8_t><<<blocks, kThreads>>>(words, dchunks, n, dtable, dmulti, dcanon, dsorted, t.max_len,
                                                   static_cast<uint8_t*>(out), dflag);
    else
      decode_kernel<uint16_t><<<blocks, kThreads>>>(words, dchunks, n, dtable, dmulti, dcanon, dsorted, t.max_len,
                                                    static_cast<uint16_t*>(out), dflag);
    ok = cuda_check(cudaGetLastError(), "huffman decode_kernel launch", error);
    unsigned long long bad = kNoBad;
    if (ok) ok = cuda_check(cudaMemcpy(&bad, dflag, sizeof bad, cudaMemcpyDeviceToHost), "cudaMemcpy (result)", error);
    if (ok) *corrupt = bad != kNoBad;
  }
  if (pooled)
    cudaFreeAsync(dev, 0);
  else
    cudaFree(dev);
  return ok;
}

}  // namespace huffman
}  // namespace pyserve
