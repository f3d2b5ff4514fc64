// NF4 dequantisation of bitsandbytes' 4-bit format (the CUDA C++ path of triton_kernels/nf4.py).
//
// out[2i] = code[byte_i >> 4] * scale, out[2i + 1] = code[byte_i & 15] * scale, with scale the
// absmax of the block (blocksize elements) both nibbles of byte i lie in; double-quantised:
//   scale = nested_code[q[b]] * nested_absmax[b / nested_blocksize] + offset
// with the product rounded to fp32 before the add (__fmul_rn / __fadd_rn: no FMA contraction),
// so the result is bit-exact with bitsandbytes. The output is rounded to nearest even.
// Layout: a thread turns one 4-byte word of packed codes into 8 outputs, and a warp's 32 threads
// take 32 adjacent words, so each load instruction reads 128 contiguous bytes and each store
// writes 32 x 8 contiguous outputs (every sector whole). kWords independent words per thread,
// their loads issued before any arithmetic, keep enough bytes in flight to reach copy bandwidth.
// The code tables sit in shared memory; a word's 4 bytes share one scale when blocks are 8 bytes
// or more (blocksize a multiple of 8), else each byte looks its own up.
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
constexpr int kWords = 4;  // 4-byte words per thread: 16 packed bytes, 32 outputs
constexpr int64_t kWordsPerBlock = int64_t{kThreads} * kWords;

// 8 outputs of one word (bytes b0..b3 little-endian: byte j holds outputs 2j, 2j + 1)
template <typename T, bool kNested>
__device__ __forceinline__ void decode_word(uint32_t word, int64_t first_byte, int64_t n_bytes, const float* table,
                                            const void* absmax, const float* nested_absmax, const float* nested_table,
                                            float shift, int half_block, int nested_blocksize, bool one_scale,
                                            T* vals) {
  float scale = nf4_block_scale<kNested>(absmax, nested_absmax, nested_table, shift, first_byte / half_block,
                                         nested_blocksize);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (!one_scale && j > 0 && first_byte + j < n_bytes) {  // (past the data: no scale to read, nothing stored)
      scale = nf4_block_scale<kNested>(absmax, nested_absmax, nested_table, shift, (first_byte + j) / half_block,
                                       nested_blocksize);
    }
    const uint32_t byte = (word >> (8 * j)) & 0xFF;
    vals[2 * j] = from_float<T>(__fmul_rn(table[byte >> 4], scale));
    vals[2 * j + 1] = from_float<T>(__fmul_rn(table[byte & 15], scale));
  }
}

// aligned: packed 4-byte and out 8-element aligned (then every full word loads and stores whole)
template <typename T, bool kNested, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    nf4_dequant_kernel(const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                       const float* __restrict__ code, const float* __restrict__ nested_absmax,
                       const float* __restrict__ nested_code, const float* __restrict__ offset,
                       T* __restrict__ out, int64_t n_elements, int blocksize, int nested_blocksize) {
  __shared__ float table[16];
  __shared__ float nested_table[kNested ? 256 : 1];
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
  if constexpr (kNested) nested_table[threadIdx.x] = nested_code[threadIdx.x];  // kThreads == 256
  __syncthreads();
  const int64_t n_bytes = (n_elements + 1) / 2;
  const int64_t n_words = (n_bytes + 3) / 4;
  const float shift = kNested ? *offset : 0.0f;
  const int half_block = blocksize / 2;  // bytes per block (blocksize is even)
  const bool one_scale = half_block % 4 == 0;
  const int64_t first_word = static_cast<int64_t>(blockIdx.x) * kWordsPerBlock + threadIdx.x;
  uint32_t words[kWords];
#pragma unroll
  for (int u = 0; u < kWords; ++u) {
    const int64_t w = first_word + int64_t{u} * kThreads;
    const int64_t b = 4 * w;
    words[u] = 0;
    if (kAligned && b + 4 <= n_bytes) {
      words[u] = __ldg(reinterpret_cast<const uint32_t*>(packed + b));
    } else if (w < n_words) {
      for (int j = 0; j < 4 && b + j < n_bytes; ++j) words[u] |= uint32_t{packed[b + j]} << (8 * j);
    }
  }
#pragma unroll
  for (int u = 0; u < kWords; ++u) {
    const int64_t w = first_word + int64_t{u} * kThreads;
    if (w >= n_words) break;
    alignas(16) T vals[8];
    decode_word<T, kNested>(words[u], 4 * w, n_bytes, table, absmax, nested_absmax, nested_table, shift, half_block,
                            nested_blocksize, one_scale, vals);
    const int64_t e = 8 * w;
    if (kAligned && e + 8 <= n_elements) {
      constexpr int kStores = 8 * sizeof(T) / 16;  // 16-byte stores: 1 for 16-bit outputs, 2 for fp32
#pragma unroll
      for (int j = 0; j < kStores; ++j) reinterpret_cast<uint4*>(out + e)[j] = reinterpret_cast<const uint4*>(vals)[j];
    } else {
      for (int j = 0; j < 8 && e + j < n_elements; ++j) out[e + j] = vals[j];
    }
  }
}

template <typename T, bool kNested>
cudaError_t launch_aligned_or_not(const uint8_t* packed, const void* absmax, const float* code,
                                  const float* nested_absmax, const float* nested_code, const float* offset, T* out,
                                  int64_t n_elements, int blocksize, int nested_blocksize, unsigned blocks,
                                  cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(packed) % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned) {
    nf4_dequant_kernel<T, kNested, true><<<blocks, kThreads, 0, stream>>>(
        packed, absmax, code, nested_absmax, nested_code, offset, out, n_elements, blocksize, nested_blocksize);
  } else {
    nf4_dequant_kernel<T, kNested, false><<<blocks, kThreads, 0, stream>>>(
        packed, absmax, code, nested_absmax, nested_code, offset, out, n_elements, blocksize, nested_blocksize);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const uint8_t* packed, const void* absmax, const float* code, const float* nested_absmax,
                   const float* nested_code, const float* offset, void* out, int64_t n_elements,
                   int blocksize, int nested_blocksize, cudaStream_t stream) {
  const int64_t n_words = ((n_elements + 1) / 2 + 3) / 4;
  const int64_t blocks = (n_words + kWordsPerBlock - 1) / kWordsPerBlock;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  T* typed = static_cast<T*>(out);
  if (nested_absmax != nullptr) {
    return launch_aligned_or_not<T, true>(packed, absmax, code, nested_absmax, nested_code, offset, typed, n_elements,
                                          blocksize, nested_blocksize, static_cast<unsigned>(blocks), stream);
  }
  return launch_aligned_or_not<T, false>(packed, absmax, code, nested_absmax, nested_code, offset, typed, n_elements,
                                         blocksize, nested_blocksize, static_cast<unsigned>(blocks), stream);
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
