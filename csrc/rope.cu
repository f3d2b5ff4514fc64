// Rotary position embedding of q and k in one launch: the CUDA C++ path of triton_kernels/rope.py.
//
// Per token (b, s) and head, over the first rot_dim dims, h = rot_dim / 2, x1 = x[:h], x2 = x[h:rot_dim],
// and the token's cos/sin split the same way into (c1, c2), (s1, s2):
//   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2,   y[rot_dim:] = x[rot_dim:]
// (y = x cos + rotate_half(x) sin). The backward is the transposed rotation, dx1 = g1 c1 + g2 s2,
// dx2 = g2 c2 - g1 s1: the same map with (s1, s2) -> (-s2, -s1) (`inverse`).
//
// One block per token: its cos/sin row goes to shared memory once (fp32) and serves every q and k
// head. A thread rotates one (head, d) pair at a time, reading x1 and x2 before writing either, so
// out may be x (in place).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "kernels.h"

namespace fusetune {
namespace {

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ void rotate_heads(const RopeTensor& t, int64_t b, int64_t s, int64_t half,
                                             int64_t head_dim, bool copy_pass, const float* cs) {
  const T* x = static_cast<const T*>(t.x) + b * t.batch_stride + s * t.seq_stride;
  T* y = static_cast<T*>(t.out) + b * t.out_batch_stride + s * t.out_seq_stride;
  const float *c = cs, *sn = cs + 2 * half;  // c1 = c[d], c2 = c[half + d]; the same for sin
  // 32-bit (head, d) indices: heads * head_dim is small, and 64-bit division is a slow routine
  const auto pairs = static_cast<uint32_t>(t.heads * half), h = static_cast<uint32_t>(half);
  for (uint32_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const uint32_t head = i / h, d = i % h;
    const T* xh = x + head * t.head_stride;
    T* yh = y + head * t.out_head_stride;
    const float x1 = to_float(xh[d]), x2 = to_float(xh[half + d]);
    yh[d] = from_float<T>(x1 * c[d] - x2 * sn[d]);
    yh[half + d] = from_float<T>(x2 * c[half + d] + x1 * sn[half + d]);
  }
  if (copy_pass) {
    const auto rest = static_cast<uint32_t>(head_dim - 2 * half);
    const auto elements = static_cast<uint32_t>(t.heads) * rest;
    for (uint32_t i = threadIdx.x; i < elements; i += blockDim.x) {
      const uint32_t head = i / rest, d = 2 * h + i % rest;
      y[head * t.out_head_stride + d] = x[head * t.head_stride + d];
    }
  }
}

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(RopeTensor q, RopeTensor k, const C* __restrict__ cos, const C* __restrict__ sin,
                int64_t head_dim, int64_t rot_dim, int64_t cos_b, int64_t cos_s, int64_t sin_b,
                int64_t sin_s, bool inverse, bool copy_pass) {
  extern __shared__ float cs[];  // cos row, then sin row (the inverse's -s2, -s1 already swapped in)
  const int64_t s = blockIdx.x, b = blockIdx.y, half = rot_dim / 2;
  const C* cos_row = cos + b * cos_b + s * cos_s;
  const C* sin_row = sin + b * sin_b + s * sin_s;
  for (int64_t d = threadIdx.x; d < rot_dim; d += blockDim.x) {
    cs[d] = to_float(cos_row[d]);
    // inverse: (s1, s2) -> (-s2, -s1), the sin row's halves swapped and negated
    cs[rot_dim + d] = inverse ? -to_float(sin_row[d < half ? d + half : d - half]) : to_float(sin_row[d]);
  }
  __syncthreads();
  rotate_heads<T>(q, b, s, half, head_dim, copy_pass, cs);
  rotate_heads<T>(k, b, s, half, head_dim, copy_pass, cs);
}

template <typename T, typename C>
cudaError_t launch(const RopeTensor& q, const RopeTensor& k, const void* cos, const void* sin,
                   int64_t batch, int64_t seq, int64_t head_dim, int64_t rot_dim, int64_t cos_b,
                   int64_t cos_s, int64_t sin_b, int64_t sin_s, bool inverse, bool copy_pass,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(seq), static_cast<unsigned>(batch));
  const size_t shared = 2 * static_cast<size_t>(rot_dim) * sizeof(float);
  rope_kernel<T, C><<<grid, kThreads, shared, stream>>>(q, k, static_cast<const C*>(cos),
                                                         static_cast<const C*>(sin), head_dim, rot_dim,
                                                         cos_b, cos_s, sin_b, sin_s, inverse, copy_pass);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rope(const RopeTensor& q, const RopeTensor& k, const void* cos, const void* sin,
                 int64_t batch, int64_t seq, int64_t head_dim, int64_t rot_dim, int64_t cos_batch_stride,
                 int64_t cos_seq_stride, int64_t sin_batch_stride, int64_t sin_seq_stride, bool inverse,
                 bool copy_pass, DType dtype, DType cos_dtype, cudaStream_t stream) {
  if (batch * seq == 0) return cudaSuccess;
  if (rot_dim < 2 || rot_dim % 2 != 0 || rot_dim > head_dim || seq > INT32_MAX || batch > 65535) {
    return cudaErrorInvalidValue;
  }
  return with_element_type(dtype, [&](auto type) {
    return with_element_type(cos_dtype, [&](auto cos_type) {
      return launch<typename decltype(type)::type, typename decltype(cos_type)::type>(
          q, k, cos, sin, batch, seq, head_dim, rot_dim, cos_batch_stride, cos_seq_stride, sin_batch_stride,
          sin_seq_stride, inverse, copy_pass, stream);
    });
  });
}

}  // namespace fusetune
