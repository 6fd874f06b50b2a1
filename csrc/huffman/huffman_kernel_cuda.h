// CUDA Huffman decoding (huffman_kernel.cu): one thread per bitstream / chunk of a parsed stream.
// Plain C++ declarations so the launcher (.cpp) can call them without CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "huffman/huffman_kernel.h"

namespace pyserve {
namespace huffman {

// Decodes the stream data[0 .. size) (host memory), already parsed and validated by parse_stream
// into `info`, into the device array out [info.count] of info.type, on the device that owns `out`
// (made this thread's current CUDA device).
// Each thread decodes one bitstream (format version 1: at most 16, so little parallelism) or one
// chunk (version 2), so the work spreads over ceil(N / C) threads.
// Returns false with *error set when a CUDA call fails. A bitstream that does not decode to exactly
// its symbol count in exactly its bit length sets *corrupt (out is then partly written); the caller
// names the problem by decoding on the host (decode_symbols gives the message).
bool decode_symbols_cuda(const uint8_t* data, std::size_t size, const StreamInfo& info, void* out, bool* corrupt,
                         std::string* error);

}  // namespace huffman
}  // namespace pyserve
