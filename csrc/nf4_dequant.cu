// NF4 dequantisation of bitsandbytes' 4-bit format (the CUDA C++ path of triton_kernels/nf4.py).
//
// out[2i] = code[byte_i >> 4] * scale, out[2i + 1] = code[byte_i & 15] * scale, with scale the
// absmax of the block (blocksize elements) both nibbles of byte i lie in; double-quantised:
//   scale = nested_code[q[b]] * nested_absmax[b / nested_blocksize] + offset
// with the product rounded to fp32 before the add (__fmul_rn / __fadd_rn: no FMA contraction),
// so the result is bit-exact with bitsandbytes. The output is rounded to nearest even. Each
// thread reads 16 packed bytes with one 16-byte load where the data is aligned, looks up one scale
// for them (blocksize >= 64), and writes its 32 outputs with 16-byte stores.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "kernels.h"
#include "nf4.cuh"

namespace fusetune {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 16;  // one 16-byte load; 32 outputs

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
  alignas(16) uint8_t bytes[kBytesPerThread];
  if (first + kBytesPerThread <= n_bytes && reinterpret_cast<uintptr_t>(packed + first) % 16 == 0) {
    *reinterpret_cast<uint4*>(bytes) = *reinterpret_cast<const uint4*>(packed + first);
  } else {
#pragma unroll
    for (int j = 0; j < kBytesPerThread; ++j) bytes[j] = first + j < n_bytes ? packed[first + j] : 0;
  }
  const float shift = kNested ? *offset : 0.0f;
  const int half_block = blocksize / 2;  // bytes per block (blocksize is even)
  // a thread's 16 bytes lie in one block when blocks are 32 bytes or more (blocksize >= 64, the
  // usual case); smaller blocks look the scale up per byte
  const bool one_block = half_block % kBytesPerThread == 0;
  float scale = nf4_block_scale<kNested>(absmax, nested_absmax, nested_code, shift, first / half_block, nested_blocksize);
  alignas(16) T vals[2 * kBytesPerThread];
#pragma unroll
  for (int j = 0; j < kBytesPerThread; ++j) {
    if (!one_block && j > 0) {
      scale = nf4_block_scale<kNested>(absmax, nested_absmax, nested_code, shift, (first + j) / half_block,
                                   nested_blocksize);
    }
    vals[2 * j] = from_float<T>(__fmul_rn(table[bytes[j] >> 4], scale));
    vals[2 * j + 1] = from_float<T>(__fmul_rn(table[bytes[j] & 15], scale));
  }
  const int64_t first_out = 2 * first;
  if (first_out + 2 * kBytesPerThread <= n_elements && reinterpret_cast<uintptr_t>(out + first_out) % 16 == 0) {
    constexpr int kStores = 2 * kBytesPerThread * sizeof(T) / 16;
#pragma unroll
    for (int j = 0; j < kStores; ++j) {
      reinterpret_cast<uint4*>(out + first_out)[j] = reinterpret_cast<const uint4*>(vals)[j];
    }
  } else {
    for (int j = 0; j < 2 * kBytesPerThread && first_out + j < n_elements; ++j) out[first_out + j] = vals[j];
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
  return with_element_type(out_dtype, [&](auto type) {
    return launch<typename decltype(type)::type>(packed, absmax, code, nested_absmax, nested_code, offset, out,
                                                 n_elements, blocksize, nested_blocksize, stream);
  });
}

}  // namespace fusetune
