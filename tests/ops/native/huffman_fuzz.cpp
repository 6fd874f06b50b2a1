// Mutation fuzzer for the Huffman kernel, meant to run under AddressSanitizer/UBSan:
//
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -Icsrc \
//       tests/ops/native/huffman_fuzz.cpp csrc/huffman/huffman_kernel.cpp -o /tmp/huffman_fuzz
//   /tmp/huffman_fuzz [iterations] [seed]
//
// Every input buffer and every output buffer is a heap allocation of exactly the right size, so
// any read or write past either end is reported. Round trips must be exact; mutated streams must
// either be rejected or decode into exactly `count` symbols. Exit status 0 means no finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "huffman/huffman_kernel.h"

using namespace pyserve::huffman;

namespace {

std::mt19937_64 rng;

uint64_t uniform(uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng); }

// Symbols from a few shapes of distribution.
std::vector<uint16_t> make_symbols(SymbolType type, std::size_t n) {
  const uint32_t top = type == SymbolType::kUint8 ? 255 : 65535;
  std::vector<uint16_t> x(n);
  const int kind = static_cast<int>(uniform(0, 4));
  std::geometric_distribution<uint32_t> geo(kind == 0 ? 0.3 : 0.02);
  for (auto& v : x) {
    switch (kind) {
      case 0:
      case 1: v = static_cast<uint16_t>(std::min<uint32_t>(geo(rng), top)); break;
      case 2: v = static_cast<uint16_t>(uniform(0, top)); break;
      case 3: v = static_cast<uint16_t>(uniform(0, 1) ? top : 0); break;
      default: v = 7; break;
    }
  }
  if (uniform(0, 1)) {  // shift away from 0 so that the smallest symbol present is not 0
    const uint32_t offset = static_cast<uint32_t>(uniform(1, top / 2));
    for (auto& v : x) v = static_cast<uint16_t>(std::min<uint32_t>(v + offset, top));
  }
  return x;
}

// Decode `stream` (copied into an exactly sized heap buffer); returns whether it was accepted.
bool try_decode(const std::vector<uint8_t>& stream, std::vector<uint8_t>* decoded_bytes, StreamInfo* info_out) {
  std::unique_ptr<uint8_t[]> in(new uint8_t[stream.size() ? stream.size() : 1]);
  if (!stream.empty()) std::memcpy(in.get(), stream.data(), stream.size());
  StreamInfo info;
  std::string err;
  if (!parse_stream(in.get(), stream.size(), &info, &err)) {
    if (err.empty()) {
      std::fprintf(stderr, "parse_stream failed without a message\n");
      std::exit(2);
    }
    return false;
  }
  if (info.count > 8 * static_cast<uint64_t>(stream.size())) {
    std::fprintf(stderr, "accepted a symbol count %llu beyond 8 * %zu\n", (unsigned long long)info.count, stream.size());
    std::exit(2);
  }
  const std::size_t out_bytes = static_cast<std::size_t>(info.count) * symbol_bytes(info.type);
  std::unique_ptr<uint8_t[]> out(new uint8_t[out_bytes ? out_bytes : 1]);
  const bool ok = decode_symbols(in.get(), stream.size(), info, out.get(), &err);
  if (!ok && err.empty()) {
    std::fprintf(stderr, "decode_symbols failed without a message\n");
    std::exit(2);
  }
  if (ok && decoded_bytes) decoded_bytes->assign(out.get(), out.get() + out_bytes);
  if (info_out) *info_out = info;
  return ok;
}

std::vector<uint8_t> encode(const std::vector<uint16_t>& x, SymbolType type) {
  std::vector<uint8_t> packed(x.size() * symbol_bytes(type));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (type == SymbolType::kUint8)
      packed[i] = static_cast<uint8_t>(x[i]);
    else
      std::memcpy(&packed[2 * i], &x[i], 2);
  }
  EncodePlan plan;
  // Half of the streams in format version 2 (chunks of 1..3000 symbols), half in version 1.
  const uint64_t chunk = uniform(0, 1) ? uniform(1, 3000) : 0;
  plan_encode(packed.data(), x.size(), type, &plan, chunk);
  std::unique_ptr<uint8_t[]> out(new uint8_t[plan.total_bytes]);
  if (!write_encoded(packed.data(), plan, out.get(), plan.total_bytes)) {
    std::fprintf(stderr, "write_encoded refused its own plan\n");
    std::exit(2);
  }
  std::vector<uint8_t> stream(out.get(), out.get() + plan.total_bytes);
  std::vector<uint8_t> decoded;
  if (!try_decode(stream, &decoded, nullptr) || decoded != packed) {
    std::fprintf(stderr, "round trip failed (n=%zu, type=%d)\n", x.size(), static_cast<int>(type));
    std::exit(1);
  }
  return stream;
}

}  // namespace

int main(int argc, char** argv) {
  const long iterations = argc > 1 ? std::atol(argv[1]) : 300;
  rng.seed(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 12345);
  long accepted = 0, rejected = 0;
  for (long it = 0; it < iterations; ++it) {
    const SymbolType type = uniform(0, 1) ? SymbolType::kUint8 : SymbolType::kUint16;
    static const std::size_t sizes[] = {0, 1, 2, 5, 40, 300, 2000, 40000, 70001};
    const std::size_t n = sizes[uniform(0, 8)];
    const std::vector<uint8_t> stream = encode(make_symbols(type, n), type);
    for (int m = 0; m < 40; ++m) {
      std::vector<uint8_t> s = stream;
      switch (uniform(0, 5)) {
        case 0:  // truncate
          s.resize(uniform(0, s.size() ? s.size() - 1 : 0));
          break;
        case 1:  // flip bits anywhere
          if (!s.empty())
            for (uint64_t k = uniform(1, 8); k > 0; --k) s[uniform(0, s.size() - 1)] ^= 1u << uniform(0, 7);
          break;
        case 2:  // flip bits in the first 64 bytes (header, table, sizes)
          if (!s.empty())
            for (uint64_t k = uniform(1, 3); k > 0; --k) s[uniform(0, std::min<std::size_t>(63, s.size() - 1))] ^= 1u << uniform(0, 7);
          break;
        case 3:  // random payload tail
          for (std::size_t i = std::min<std::size_t>(s.size(), 64 + uniform(0, 64)); i < s.size(); ++i)
            s[i] = static_cast<uint8_t>(uniform(0, 255));
          break;
        case 4:  // append garbage
          for (uint64_t k = uniform(1, 16); k > 0; --k) s.push_back(static_cast<uint8_t>(uniform(0, 255)));
          break;
        default:  // overwrite a header field with an extreme value
          if (s.size() >= kHeaderBytes) {
            const std::size_t pos = uniform(6, kHeaderBytes - 1);
            s[pos] = uniform(0, 1) ? 0xff : 0x00;
          }
          break;
      }
      if (try_decode(s, nullptr, nullptr))
        ++accepted;
      else
        ++rejected;
    }
  }
  std::printf("huffman_fuzz: %ld iterations, %ld mutants accepted, %ld rejected, no memory errors\n", iterations,
              accepted, rejected);
  return 0;
}
