// The per-block scale of bitsandbytes' NF4 format, shared by the dequantisation and the GEMV.
#pragma once

#include <cstdint>

namespace fusetune {

// absmax of block `block`: fp32 absmax[block], or, double-quantised (kNested), uint8 codes into
// nested_code scaled by nested_absmax per nested_blocksize blocks plus offset, with the product
// rounded to fp32 before the add (__fmul_rn / __fadd_rn: no FMA contraction), bit-exact with
// bitsandbytes
template <bool kNested>
__device__ __forceinline__ float nf4_block_scale(const void* absmax, const float* nested_absmax,
                                                 const float* nested_code, float offset, int64_t block,
                                                 int nested_blocksize) {
  if constexpr (kNested) {
    const uint8_t q = static_cast<const uint8_t*>(absmax)[block];
    return __fadd_rn(__fmul_rn(nested_code[q], nested_absmax[block / nested_blocksize]), offset);
  } else {
    return static_cast<const float*>(absmax)[block];
  }
}

}  // namespace fusetune
