// Entry point of the fused-QKV attention (quant/attention_kernel.h): argument checks, GIL handling.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

namespace pyserve {

// qkv [B, S, 3 H D] float32, heads H, mask [Bm, Sq, S] float32 (Bm in {1, B}, Sq in {1, S}) or None,
// scale, precision "fp32" or "bf16" (bfloat16 products where attention_qkv_bf16) -> [B, S, H D] float32.
pybind11::array attention_qkv(const pybind11::array& qkv, int64_t heads, const std::optional<pybind11::array>& mask,
                              double scale, const std::string& precision);

// h [B, S, E] float32, mask [B, S] float32 or int64 -> [B, E] float32 (quant::mean_pool_normalize).
pybind11::array mean_pool_normalize(const pybind11::array& h, const pybind11::array& mask, double eps_count,
                                    double eps_norm);

// Whether attention_qkv runs its AVX2 kernel for head size D on this CPU (else a scalar loop).
bool attention_qkv_fast(int64_t head_size);

// Whether attention_qkv(precision="bf16") runs the bfloat16 kernel for head size D on this CPU.
bool attention_qkv_bf16(int64_t head_size);

}  // namespace pyserve
