// NF4 dequantisation of bitsandbytes' 4-bit format (the CUDA C++ path of triton_kernels/nf4.py).
//
// out[2i] = code[byte_i >> 4] * scale, out[2i + 1] = code[byte_i & 15] * scale, with scale the
// absmax of the block (blocksize elements) both nibbles of byte i lie in; double-quantised:
//   scale = nested_code[q[b]] * nested_absmax[b / nested_blocksize] + offset
// with the product rounded to fp32 before the add (__fmul_rn / __fadd_rn: no FMA contraction),
// so the result is bit-exact with bitsandbytes and with the Triton kernel. The output is rounded
// to nearest even. Each thread reads 4 packed bytes (8 outputs) with one 32-bit load where the
// data is aligned, and writes its outputs as one 16-byte (bf16/fp16) or two 16-byte (fp32) stores.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace fusetune {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 4;

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
struct alignas(16) Out8 {  // the 8 outputs of one thread, stored together
  T v[8];
};

template <typename T, bool kNested>
__global__ void __launch_bounds__(kThreads)
    nf4_dequant_kernel(const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                       const float* __restrict__ code, const float* __restrict__ nested_absmax,
                       const float* __restrict__ nested_code, const float* __restrict__ offset,
                       T* __restrict__ out, int64_t n_elements, int blocksize, int nested_blocksize) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t n_bytes = (n_elements + 1) / 2;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kBytesPerThread;
  if (first >= n_bytes) return;
  uint8_t bytes[kBytesPerThread];
  const bool whole = first + kBytesPerThread <= n_bytes;
  if (whole && (reinterpret_cast<uintptr_t>(packed + first) % 4 == 0)) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + first);
#pragma unroll
    for (int j = 0; j < kBytesPerThread; ++j) bytes[j] = (word >> (8 * j)) & 0xFF;
  } else {
#pragma unroll
    for (int j = 0; j < kBytesPerThread; ++j) bytes[j] = first + j < n_bytes ? packed[first + j] : 0;
  }
  Out8<T> vals;
  const int half_block = blocksize / 2;  // bytes per block (blocksize is even)
#pragma unroll
  for (int j = 0; j < kBytesPerThread; ++j) {
    const int64_t block = (first + j) / half_block;
    float scale;
    if constexpr (kNested) {
      const uint8_t q = static_cast<const uint8_t*>(absmax)[block];
      scale = __fadd_rn(__fmul_rn(nested_code[q], nested_absmax[block / nested_blocksize]), *offset);
    } else {
      scale = static_cast<const float*>(absmax)[block];
    }
    const float hi = __fmul_rn(table[bytes[j] >> 4], scale), lo = __fmul_rn(table[bytes[j] & 15], scale);
    vals.v[2 * j] = from_float<T>(hi);
    vals.v[2 * j + 1] = from_float<T>(lo);
  }
  const int64_t first_out = 2 * first;
  if (first_out + 8 <= n_elements && reinterpret_cast<uintptr_t>(out + first_out) % 16 == 0) {
    *reinterpret_cast<Out8<T>*>(out + first_out) = vals;
  } else {
    for (int j = 0; j < 8 && first_out + j < n_elements; ++j) out[first_out + j] = vals.v[j];
  }
}

template <typename T>
cudaError_t launch(const uint8_t* packed, const void* absmax, const float* code, const float* nested_absmax,
                   const float* nested_code, const float* offset, void* out, int64_t n_elements,
                   int blocksize, int nested_blocksize, cudaStream_t stream) {
  const int64_t n_bytes = (n_elements + 1) / 2;
  const int64_t per_block = int64_t{kThreads} * kBytesPerThread;
  const int64_t blocks = (n_bytes + per_block - 1) / per_block;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  T* typed = static_cast<T*>(out);
  if (nested_absmax != nullptr) {
    nf4_dequant_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        packed, absmax, code, nested_absmax, nested_code, offset, typed, n_elements, blocksize,
        nested_blocksize);
  } else {
    nf4_dequant_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        packed, absmax, code, nested_absmax, nested_code, offset, typed, n_elements, blocksize,
        nested_blocksize);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_dequant(const uint8_t* packed, const void* absmax, const float* code,
                        const float* nested_absmax, const float* nested_code, const float* offset,
                        void* out, int64_t n_elements, int blocksize, int nested_blocksize,
                        DType out_dtype, cudaStream_t stream) {
  if (n_elements <= 0) return cudaSuccess;
  if (blocksize < 2 || blocksize % 2 != 0 || nested_blocksize < 1) return cudaErrorInvalidValue;
  switch (out_dtype) {
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(packed, absmax, code, nested_absmax, nested_code, offset, out,
                                   n_elements, blocksize, nested_blocksize, stream);
    case DType::kFloat16:
      return launch<__half>(packed, absmax, code, nested_absmax, nested_code, offset, out, n_elements,
                            blocksize, nested_blocksize, stream);
    default:
      return launch<float>(packed, absmax, code, nested_absmax, nested_code, offset, out, n_elements,
                           blocksize, nested_blocksize, stream);
  }
}

}  // namespace fusetune
