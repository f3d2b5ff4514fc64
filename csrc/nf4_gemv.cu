// NF4 dequantise + small-M matmul (decoding): the CUDA C++ path of triton_kernels/nf4_gemv.py.
//
//   out[m, n] = sum_k x[m, k] W[n, k],  W[n, k] = code[nibble(e)] * scale(e / blocksize),  e = n K + k
// (nibble: the high one of packed[e / 2] for even e; scale as nf4_dequant's, nf4.cuh). The dense
// weight is never written. Sums in fp32, the weight unrounded (as the Triton kernel's M == 1 path);
// out is rounded once to x's dtype.
//
// One warp per output row n: each lane takes 16 packed bytes (32 weights, one 16-byte load) at a
// time, looks up their one scale (blocksize a multiple of 32), and adds their products with the
// matching 32 entries of every row of x into its M accumulators; the warp then sums its lanes.
// Taken where K is a multiple of 32 (rows start on 16 bytes) and blocksize of 32; the op
// (fusetune.ops.nf4_gemv) dequantises and multiplies for other shapes.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "kernels.h"
#include "nf4.cuh"

namespace fusetune {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kBytesPerLane = 16;  // one 16-byte load: 32 weights

template <typename T, bool kNested>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                    const float* __restrict__ code, const float* __restrict__ nested_absmax,
                    const float* __restrict__ nested_code, const float* __restrict__ offset, T* __restrict__ out,
                    int m, int64_t n, int64_t k, int blocksize, int nested_blocksize) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= n) return;
  const float shift = kNested ? *offset : 0.0f;
  const uint8_t* wrow = packed + row * (k / 2);
  float acc[kNf4GemvMaxM] = {};
  for (int64_t chunk = lane; chunk < k / 32; chunk += 32) {
    alignas(16) uint8_t bytes[kBytesPerLane];
    *reinterpret_cast<uint4*>(bytes) = *reinterpret_cast<const uint4*>(wrow + chunk * kBytesPerLane);
    const int64_t first = row * k + chunk * 32;  // the chunk's first element in the flat weight
    const float scale = nf4_block_scale<kNested>(absmax, nested_absmax, nested_code, shift, first / blocksize,
                                                 nested_blocksize);
    float w[32];
#pragma unroll
    for (int j = 0; j < kBytesPerLane; ++j) {
      w[2 * j] = __fmul_rn(table[bytes[j] >> 4], scale);
      w[2 * j + 1] = __fmul_rn(table[bytes[j] & 15], scale);
    }
#pragma unroll
    for (int mi = 0; mi < kNf4GemvMaxM; ++mi) {
      if (mi >= m) break;
      const T* xs = x + mi * k + chunk * 32;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 32; ++j) sum = fmaf(w[j], to_float(xs[j]), sum);
      acc[mi] += sum;
    }
  }
#pragma unroll
  for (int mi = 0; mi < kNf4GemvMaxM; ++mi) {
    if (mi >= m) break;
    float v = acc[mi];
#pragma unroll
    for (int delta = 16; delta > 0; delta /= 2) v += __shfl_xor_sync(0xffffffffu, v, delta);
    if (lane == 0) out[mi * n + row] = from_float<T>(v);
  }
}

template <typename T>
cudaError_t launch(const void* x, const uint8_t* packed, const void* absmax, const float* code,
                   const float* nested_absmax, const float* nested_code, const float* offset, void* out, int m,
                   int64_t n, int64_t k, int blocksize, int nested_blocksize, cudaStream_t stream) {
  const int64_t blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const auto* xt = static_cast<const T*>(x);
  auto* o = static_cast<T*>(out);
  const auto grid = static_cast<unsigned>(blocks);
  if (nested_absmax != nullptr) {
    nf4_gemv_kernel<T, true><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        xt, packed, absmax, code, nested_absmax, nested_code, offset, o, m, n, k, blocksize, nested_blocksize);
  } else {
    nf4_gemv_kernel<T, false><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        xt, packed, absmax, code, nested_absmax, nested_code, offset, o, m, n, k, blocksize, nested_blocksize);
  }
  return cudaGetLastError();
}

}  // namespace

bool nf4_gemv_supported(int64_t m, int64_t k, int blocksize, const void* packed) {
  return m >= 1 && m <= kNf4GemvMaxM && k % 32 == 0 && blocksize % 32 == 0 &&
         reinterpret_cast<uintptr_t>(packed) % 16 == 0;
}

cudaError_t nf4_gemv(const void* x, const uint8_t* packed, const void* absmax, const float* code,
                     const float* nested_absmax, const float* nested_code, const float* offset, void* out,
                     int64_t m, int64_t n, int64_t k, int blocksize, int nested_blocksize, DType dtype,
                     cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (!nf4_gemv_supported(m, k, blocksize, packed) || nested_blocksize < 1) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto type) {
    return launch<typename decltype(type)::type>(x, packed, absmax, code, nested_absmax, nested_code, offset, out,
                                                 static_cast<int>(m), n, k, blocksize, nested_blocksize, stream);
  });
}

}  // namespace fusetune
