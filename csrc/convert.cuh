// The element types of fusetune's CUDA kernels (fp32, fp16, bf16): float <-> each, rounding to
// nearest even, and the switch from a runtime DType to its type (a launcher's template argument).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace fusetune {

template <typename T>
struct Type {
  using type = T;
};

// f(Type<T>{}) for T the element type of dtype: a launcher's template argument from a runtime DType
template <typename F>
auto with_element_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16:
      return f(Type<__nv_bfloat16>{});
    case DType::kFloat16:
      return f(Type<__half>{});
    default:
      return f(Type<float>{});
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace fusetune
