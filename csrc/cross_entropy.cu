// Cross-entropy over a large vocabulary, forward and backward: the CUDA C++ path of
// triton_kernels/cross_entropy.py, with the same formulas. Per row x of V logits, target t:
//   u = s x (s: the logit scale, 1 when none),  z = c tanh(u / c) (c: the softcap; z = u when none)
//   lse = log sum_j exp(z_j),  loss = lse - z_t
//   dx_j = g (exp(z_j - lse) - [j == t]) (1 - tanh(u_j / c)^2) s     (g: the row's gradient scale)
// Rows whose target is ignore_index are neither read nor computed (loss and lse 0, dx 0); a target
// outside [0, V) gives a NaN loss (the op checks targets on the device first), and so does a NaN logit.
//
// Forward: one block per row, an online log-sum-exp per thread (running max and rescaled sum in
// fp32) over 16-byte loads where the row allows, then the block's (max, sum) pairs combined with
// warp shuffles. Backward: elementwise, one tile of a row per block; dx may be x (in place: each
// element is read before its gradient is stored, by the same thread).
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "kernels.h"

namespace fusetune {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// z from a logit, and dz/dx (for the backward)
struct Transform {
  float scale, cap, inv_cap;  // scale 1 without a logit scale; cap 0 without a softcap

  __device__ __forceinline__ float z(float x) const {
    const float u = x * scale;
    return cap > 0.0f ? cap * tanh_of(u * inv_cap) : u;
  }
  __device__ __forceinline__ float z_and_slope(float x, float* dz_dx) const {
    const float u = x * scale;
    if (cap > 0.0f) {
      const float th = tanh_of(u * inv_cap);
      *dz_dx = (1.0f - th * th) * scale;
      return cap * th;
    }
    *dz_dx = scale;
    return u;
  }
  // tanh(v) = 1 - 2 / (exp(2v) + 1): exp -> inf or 0 at large |v| gives +-1, never NaN
  static __device__ __forceinline__ float tanh_of(float v) { return 1.0f - 2.0f / (__expf(2.0f * v) + 1.0f); }
};

// a running (max, sum of exp(z - max)); an empty one is (-inf, 0)
struct Lse {
  float m, s;

  __device__ __forceinline__ void add(float z) {
    if (z > m) {
      s = s * __expf(m - z) + 1.0f;
      m = z;
    } else if (z != -INFINITY) {  // (a NaN z lands here and makes s NaN: the loss shows it)
      s += __expf(z - m);
    }
  }
  __device__ __forceinline__ void merge(float m2, float s2) {
    const float top = fmaxf(m, m2);
    if (top == -INFINITY) return;  // both empty
    s = s * __expf(m - top) + s2 * __expf(m2 - top);
    m = top;
  }
};

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// the kVec elements of row `row` from column `col` (a multiple of kVec; stride too): indexed in
// Packs so that the compiler sees the alignment and moves each with one 16-byte access
template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec>& pack_at(T* base, int64_t row, int64_t stride, int64_t col) {
  return reinterpret_cast<Pack<T, kVec>*>(base)[row * (stride / kVec) + col / kVec];
}

template <typename T, int kVec>
__device__ __forceinline__ const Pack<T, kVec>& pack_at(const T* base, int64_t row, int64_t stride, int64_t col) {
  return reinterpret_cast<const Pack<T, kVec>*>(base)[row * (stride / kVec) + col / kVec];
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ targets,
                             float* __restrict__ loss, float* __restrict__ lse_out, int64_t n_cols,
                             int64_t x_row_stride, int64_t t_stride, int64_t ignore_index, Transform tf) {
  const int64_t row = blockIdx.x;
  const int64_t target = targets[row * t_stride];
  if (target == ignore_index) {  // not read at all
    if (threadIdx.x == 0) loss[row] = lse_out[row] = 0.0f;
    return;
  }
  const T* xr = x + row * x_row_stride;
  Lse acc{-INFINITY, 0.0f};
  for (int64_t col = int64_t{threadIdx.x} * kVec; col < n_cols; col += int64_t{kThreads} * kVec) {
    const Pack<T, kVec> p = pack_at<T, kVec>(x, row, x_row_stride, col);
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc.add(tf.z(to_float(p.v[j])));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    acc.merge(__shfl_xor_sync(0xffffffffu, acc.m, offset), __shfl_xor_sync(0xffffffffu, acc.s, offset));
  }
  __shared__ float warp_m[kWarps], warp_s[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = acc.m;
    warp_s[warp] = acc.s;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kWarps; ++w) acc.merge(warp_m[w], warp_s[w]);
  const float lse = acc.m + logf(acc.s);
  const bool in_range = target >= 0 && target < n_cols;
  loss[row] = in_range ? lse - tf.z(to_float(xr[target])) : NAN;
  lse_out[row] = lse;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_bwd_kernel(const T* x, T* dx, const int64_t* __restrict__ targets,
                             const float* __restrict__ lse_in, const float* __restrict__ grad, int64_t n_cols,
                             int64_t x_row_stride, int64_t dx_row_stride, int64_t t_stride, int64_t g_stride,
                             int64_t ignore_index, Transform tf) {
  const int64_t row = blockIdx.x;
  const int64_t col = (int64_t{blockIdx.y} * kThreads + threadIdx.x) * kVec;
  if (col >= n_cols) return;
  const int64_t target = targets[row * t_stride];
  Pack<T, kVec> out;
  if (target == ignore_index) {  // only zeroed
#pragma unroll
    for (int j = 0; j < kVec; ++j) out.v[j] = from_float<T>(0.0f);
  } else {
    const float g = grad[row * g_stride], lse = lse_in[row];
    const Pack<T, kVec> p = pack_at<T, kVec>(x, row, x_row_stride, col);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float slope;
      const float z = tf.z_and_slope(to_float(p.v[j]), &slope);
      const float onehot = col + j == target ? 1.0f : 0.0f;
      out.v[j] = from_float<T>(g * (__expf(z - lse) - onehot) * slope);
    }
  }
  pack_at<T, kVec>(dx, row, dx_row_stride, col) = out;
}

Transform make_transform(float scale, float softcap) {
  return {scale, softcap, softcap > 0.0f ? 1.0f / softcap : 0.0f};
}

// 16-byte accesses when every row start is 16-byte aligned and rows hold whole packs
template <typename T>
bool vectorisable(const void* p, int64_t row_stride, int64_t n_cols) {
  constexpr int kVec = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_stride % kVec == 0 && n_cols % kVec == 0;
}

template <typename T>
cudaError_t launch_fwd(const void* x, const int64_t* targets, float* loss, float* lse, int64_t rows,
                       int64_t n_cols, int64_t x_row_stride, int64_t t_stride, int64_t ignore_index,
                       Transform tf, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto* xt = static_cast<const T*>(x);
  const auto blocks = static_cast<unsigned>(rows);
  if (vectorisable<T>(x, x_row_stride, n_cols)) {
    cross_entropy_fwd_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(xt, targets, loss, lse, n_cols,
                                                                      x_row_stride, t_stride, ignore_index, tf);
  } else {
    cross_entropy_fwd_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(xt, targets, loss, lse, n_cols, x_row_stride,
                                                                   t_stride, ignore_index, tf);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* x, void* dx, const int64_t* targets, const float* lse, const float* grad,
                       int64_t rows, int64_t n_cols, int64_t x_row_stride, int64_t dx_row_stride,
                       int64_t t_stride, int64_t g_stride, int64_t ignore_index, Transform tf,
                       cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = vectorisable<T>(x, x_row_stride, n_cols) && vectorisable<T>(dx, dx_row_stride, n_cols);
  const int64_t per_block = int64_t{kThreads} * (vec ? kVec : 1);
  const int64_t col_tiles = (n_cols + per_block - 1) / per_block;
  if (col_tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(col_tiles));
  const auto* xt = static_cast<const T*>(x);
  auto* dxt = static_cast<T*>(dx);
  if (vec) {
    cross_entropy_bwd_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(
        xt, dxt, targets, lse, grad, n_cols, x_row_stride, dx_row_stride, t_stride, g_stride, ignore_index, tf);
  } else {
    cross_entropy_bwd_kernel<T, 1><<<grid, kThreads, 0, stream>>>(
        xt, dxt, targets, lse, grad, n_cols, x_row_stride, dx_row_stride, t_stride, g_stride, ignore_index, tf);
  }
  return cudaGetLastError();
}

bool bad_sizes(int64_t rows, int64_t n_cols) { return rows > INT32_MAX || n_cols <= 0; }

}  // namespace

cudaError_t cross_entropy_fwd(const void* x, const int64_t* targets, float* loss, float* lse, int64_t rows,
                              int64_t n_cols, int64_t x_row_stride, int64_t t_stride, int64_t ignore_index,
                              float scale, float softcap, DType x_dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (bad_sizes(rows, n_cols)) return cudaErrorInvalidValue;
  const Transform tf = make_transform(scale, softcap);
  return with_element_type(x_dtype, [&](auto type) {
    return launch_fwd<typename decltype(type)::type>(x, targets, loss, lse, rows, n_cols, x_row_stride, t_stride,
                                                     ignore_index, tf, stream);
  });
}

cudaError_t cross_entropy_bwd(const void* x, void* dx, const int64_t* targets, const float* lse, const float* grad,
                              int64_t rows, int64_t n_cols, int64_t x_row_stride, int64_t dx_row_stride,
                              int64_t t_stride, int64_t g_stride, int64_t ignore_index, float scale, float softcap,
                              DType x_dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (bad_sizes(rows, n_cols)) return cudaErrorInvalidValue;
  const Transform tf = make_transform(scale, softcap);
  return with_element_type(x_dtype, [&](auto type) {
    return launch_bwd<typename decltype(type)::type>(x, dx, targets, lse, grad, rows, n_cols, x_row_stride,
                                                     dx_row_stride, t_stride, g_stride, ignore_index, tf, stream);
  });
}

}  // namespace fusetune
