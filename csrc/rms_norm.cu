// RMSNorm forward and backward (the CUDA C++ fallback of triton_kernels/rms_norm.py).
//
// Forward, per row x of n elements, with w' = w + offset (offset 0: Llama, 1: Gemma):
//   rstd = 1 / sqrt(mean(x^2) + eps),  xhat = x * rstd,  y = xhat * w'
// Llama rounds xhat to x's dtype before the weight product; Gemma stays in fp32 throughout.
// Backward, with g = dy * w':
//   dx = rstd * (g - xhat * mean(g * xhat))     (mean(g * xhat) = rstd / n * sum(dy * w' * x))
//   dw = sum over rows of dy * xhat              (xhat rounded as in the forward)
//
// A row is handled by a group of blockDim.x threads (a power of two); a block holds blockDim.y
// such groups. Each thread keeps up to P 16-byte packs of its row in registers, so x (and dy) is
// read from memory once; rows too long for that re-read the rest, which then comes from L2.
// Rows whose length is not a multiple of the pack (or misaligned pointers) take packs of one
// element. The forward runs one group per row; the backward is a persistent grid whose groups
// walk a slice of rows, loading the next row while reducing the current one, and keep their
// dw in registers until the end. All sums are fp32.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "kernels.h"

namespace fusetune {
namespace {

constexpr int kFwdPacks = 4;        // packs per thread held in registers, forward
constexpr int kBwdPacks = 2;        // backward (holds x and dy, the next row's, and dw)
constexpr int kFwdMaxThreads = 1024;
constexpr int kBwdMaxThreads = 512;
constexpr int kBlockThreads = 256;  // threads of a block that holds several short rows

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// xhat as the weight product sees it: rounded to x's dtype first for Llama
template <typename T>
__device__ __forceinline__ float as_multiplied(float xhat, bool cast) {
  return cast ? to_float(from_float<T>(xhat)) : xhat;
}

// Sum of v over this thread's row group (the blockDim.x threads of its threadIdx.y). Every
// thread of the block calls it the same number of times: it may synchronise the block.
__device__ __forceinline__ float group_sum(float v, float* scratch /* 32 floats */) {
  // groups narrower than a warp sit on aligned lanes, so xor offsets below the width stay inside
  for (int o = min(blockDim.x, 32u) / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (blockDim.x <= 32) return v;
  const int warps = blockDim.x / 32;
  float* mine = scratch + threadIdx.y * warps;
  if ((threadIdx.x & 31) == 0) mine[threadIdx.x / 32] = v;
  __syncthreads();
  v = 0.f;
  for (int i = 0; i < warps; ++i) v += mine[i];
  __syncthreads();  // scratch is free again for the next call
  return v;
}

template <typename T, int V>
__device__ __forceinline__ float sum_squares(const Pack<T, V>& p) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < V; ++j) s += to_float(p.v[j]) * to_float(p.v[j]);
  return s;
}

template <typename T, typename W, int V, int P>
__global__ void __launch_bounds__(kFwdMaxThreads)
rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ weight, T* __restrict__ y,
                    float* __restrict__ rstd_out, int64_t rows, int n, float eps, float offset,
                    bool cast) {
  using XP = Pack<T, V>;
  using WP = Pack<W, V>;
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < rows;  // idle threads of the last block still join group_sum
  const int packs = n / V;
  const int64_t start = (active ? row : 0) * n;
  const XP* xr = reinterpret_cast<const XP*>(x + start);

  XP xc[P];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (active && i < packs) {
      xc[k] = xr[i];
      ss += sum_squares(xc[k]);
    }
  }
  for (int64_t i = threadIdx.x + P * blockDim.x; active && i < packs; i += blockDim.x)
    ss += sum_squares(xr[i]);
  const float rstd = rsqrtf(group_sum(ss, scratch) / n + eps);
  if (!active) return;
  if (threadIdx.x == 0) rstd_out[row] = rstd;

  const WP* wr = reinterpret_cast<const WP*>(weight);
  XP* yr = reinterpret_cast<XP*>(y + start);
  auto write = [&](int64_t i, const XP& xv) {
    const WP wv = wr[i];
    XP out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float xhat = as_multiplied<T>(to_float(xv.v[j]) * rstd, cast);
      out.v[j] = from_float<T>(xhat * (to_float(wv.v[j]) + offset));
    }
    yr[i] = out;
  };
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < packs) write(i, xc[k]);
  }
  for (int64_t i = threadIdx.x + P * blockDim.x; i < packs; i += blockDim.x) write(i, xr[i]);
}

// One block per slice of rows_per_block rows; its groups walk the slice together. dw_partial
// row blockIdx.x gets the slice's dw. Columns past the register-held packs (very long rows,
// where blockDim.y == 1) accumulate dw in that row directly: one thread owns each column.
template <typename T, typename W, int V, int P>
__global__ void __launch_bounds__(kBwdMaxThreads)
rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                    const W* __restrict__ weight, const float* __restrict__ rstd,
                    T* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows, int n,
                    int64_t rows_per_block, float offset, bool cast) {
  using XP = Pack<T, V>;
  using WP = Pack<W, V>;
  extern __shared__ float dw_groups[];  // (blockDim.y, n) when blockDim.y > 1
  __shared__ float scratch[32];
  const int packs = n / V;
  const int64_t begin = blockIdx.x * rows_per_block;
  const int64_t end = min(begin + rows_per_block, rows);
  float* dw_out = dw_partial + static_cast<int64_t>(blockIdx.x) * n;
  const WP* wr = reinterpret_cast<const WP*>(weight);

  float acc[P][V];  // dw of this thread's register-held columns
#pragma unroll
  for (int k = 0; k < P; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) acc[k][j] = 0.f;
  for (int64_t i = threadIdx.x + P * blockDim.x; i < packs; i += blockDim.x)
    for (int j = 0; j < V; ++j) dw_out[i * V + j] = 0.f;

  // each group loads its next row while it reduces and writes the current one
  XP x_next[P], dy_next[P];
  float r_next = 0.f;
  auto prefetch = [&](int64_t row) {
    if (row >= end) return;
    const XP* xr = reinterpret_cast<const XP*>(x + row * n);
    const XP* dyr = reinterpret_cast<const XP*>(dy + row * n);
    r_next = rstd[row];
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < packs) {
        x_next[k] = xr[i];
        dy_next[k] = dyr[i];
      }
    }
  };
  prefetch(begin + threadIdx.y);

  for (int64_t base = begin; base < end; base += blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < end;
    const int64_t start = (active ? row : 0) * n;
    const XP* xr = reinterpret_cast<const XP*>(x + start);
    const XP* dyr = reinterpret_cast<const XP*>(dy + start);
    const float r = r_next;
    XP xc[P], dyc[P];
#pragma unroll
    for (int k = 0; k < P; ++k) {
      xc[k] = x_next[k];
      dyc[k] = dy_next[k];
    }
    prefetch(row + blockDim.y);

    float dot = 0.f;  // sum of dy * w' * x
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (active && i < packs) {
        const WP wv = wr[i];  // w is re-read each row (from L1) to save registers
#pragma unroll
        for (int j = 0; j < V; ++j)
          dot += to_float(dyc[k].v[j]) * (to_float(wv.v[j]) + offset) * to_float(xc[k].v[j]);
      }
    }
    for (int64_t i = threadIdx.x + P * blockDim.x; active && i < packs; i += blockDim.x) {
      const XP xv = xr[i], dv = dyr[i];
      const WP wv = wr[i];
      for (int j = 0; j < V; ++j)
        dot += to_float(dv.v[j]) * (to_float(wv.v[j]) + offset) * to_float(xv.v[j]);
    }
    const float mean_gx = group_sum(dot, scratch) * r / n;
    if (!active) continue;  // only in the slice's last step, so no later group_sum is missed

    XP* dxr = reinterpret_cast<XP*>(dx + start);
    auto grad = [&](const XP& xv, const XP& dv, const WP& wv, float* dw) {
      XP out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = to_float(dv.v[j]);
        const float xhat = to_float(xv.v[j]) * r;
        out.v[j] = from_float<T>(r * (d * (to_float(wv.v[j]) + offset) - xhat * mean_gx));
        dw[j] += d * as_multiplied<T>(xhat, cast);
      }
      return out;
    };
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < packs) dxr[i] = grad(xc[k], dyc[k], wr[i], acc[k]);
    }
    for (int64_t i = threadIdx.x + P * blockDim.x; i < packs; i += blockDim.x)
      dxr[i] = grad(xr[i], dyr[i], wr[i], dw_out + i * V);
  }

  if (blockDim.y == 1) {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < packs)
        for (int j = 0; j < V; ++j) dw_out[i * V + j] = acc[k][j];
    }
    return;
  }
  // several groups: sum their dw through shared memory in a fixed order (deterministic)
  float* mine = dw_groups + threadIdx.y * n;
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < packs)
      for (int j = 0; j < V; ++j) mine[i * V + j] = acc[k][j];
  }
  __syncthreads();
  for (int c = threadIdx.y * blockDim.x + threadIdx.x; c < n; c += blockDim.x * blockDim.y) {
    float s = 0.f;
    for (int g = 0; g < static_cast<int>(blockDim.y); ++g) s += dw_groups[g * n + c];
    dw_out[c] = s;
  }
}

struct RowShape {
  int threads_per_row;  // power of two
  int rows_per_block;
};

// Enough threads per row that each holds at most `per_thread` packs (up to max_threads), and
// several rows per block when rows are short.
RowShape row_shape(int packs, int per_thread, int max_threads) {
  int t = 1;
  while (t < max_threads && t * per_thread < packs) t *= 2;
  return {t, t >= kBlockThreads ? 1 : kBlockThreads / t};
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 16-byte packs of x's dtype when n and every pointer allow, else packs of one element
template <typename T, typename W>
bool vectorisable(int64_t n, const void* weight, std::initializer_list<const void*> row_ptrs) {
  constexpr int V = 16 / sizeof(T);
  if (n % V != 0 || !aligned(weight, sizeof(W) * V)) return false;
  for (const void* p : row_ptrs)
    if (!aligned(p, 16)) return false;
  return true;
}

// fn(T{}, W{}) for the supported (x, weight) dtype pairs, else `unsupported`.
template <typename R, typename Fn>
R dispatch(DType x_dtype, DType w_dtype, R unsupported, Fn&& fn) {
  switch (x_dtype) {
    case DType::kFloat32:
      if (w_dtype == DType::kFloat32) return fn(float{}, float{});
      break;
    case DType::kFloat16:
      if (w_dtype == DType::kFloat16) return fn(__half{}, __half{});
      if (w_dtype == DType::kFloat32) return fn(__half{}, float{});
      break;
    case DType::kBFloat16:
      if (w_dtype == DType::kBFloat16) return fn(__nv_bfloat16{}, __nv_bfloat16{});
      if (w_dtype == DType::kFloat32) return fn(__nv_bfloat16{}, float{});
      break;
  }
  return unsupported;
}

template <typename T, typename W, int V>
cudaError_t launch_fwd(const T* x, const W* w, T* y, float* rstd, int64_t rows, int n, float eps,
                       float offset, bool cast, cudaStream_t stream) {
  const RowShape s = row_shape(n / V, kFwdPacks, kFwdMaxThreads);
  const int64_t blocks = (rows + s.rows_per_block - 1) / s.rows_per_block;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  rms_norm_fwd_kernel<T, W, V, kFwdPacks>
      <<<static_cast<unsigned>(blocks), dim3(s.threads_per_row, s.rows_per_block), 0, stream>>>(
          x, w, y, rstd, rows, n, eps, offset, cast);
  return cudaGetLastError();
}

// Shared memory of the backward: (rows_per_block, n) fp32 when a block holds several rows, which
// happens only for short rows, so at most kBlockThreads * kBwdPacks * V floats.
size_t bwd_smem(const RowShape& s, int n) {
  return s.rows_per_block > 1 ? sizeof(float) * s.rows_per_block * n : 0;
}

// A persistent grid: as many blocks as fit on the GPU at once, at most one per row.
template <typename T, typename W, int V>
int64_t bwd_grid(int64_t rows, int n, int sm_count) {
  const RowShape s = row_shape(n / V, kBwdPacks, kBwdMaxThreads);
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm, rms_norm_bwd_kernel<T, W, V, kBwdPacks>, s.threads_per_row * s.rows_per_block,
          bwd_smem(s, n)) != cudaSuccess)
    per_sm = 1;  // the launch itself will report what is wrong
  const int64_t wanted = std::min<int64_t>(rows, std::max(1, sm_count) * std::max(1, per_sm));
  const int64_t rows_per_block = (rows + wanted - 1) / wanted;
  return (rows + rows_per_block - 1) / rows_per_block;  // so that no block gets an empty slice
}

template <typename T, typename W, int V>
cudaError_t launch_bwd(const T* dy, const T* x, const W* w, const float* rstd, T* dx,
                       float* dw_partial, int64_t rows, int n, int64_t blocks, float offset,
                       bool cast, cudaStream_t stream) {
  const RowShape s = row_shape(n / V, kBwdPacks, kBwdMaxThreads);
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  rms_norm_bwd_kernel<T, W, V, kBwdPacks>
      <<<static_cast<unsigned>(blocks), dim3(s.threads_per_row, s.rows_per_block),
         bwd_smem(s, n), stream>>>(dy, x, w, rstd, dx, dw_partial, rows, n, rows_per_block,
                                   offset, cast);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_fwd(const void* x, const void* weight, void* y, float* rstd, int64_t rows,
                         int64_t n, float eps, float offset, bool cast_before_weight,
                         DType x_dtype, DType weight_dtype, cudaStream_t stream) {
  if (n <= 0 || n > INT_MAX / 2 || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch(x_dtype, weight_dtype, cudaErrorInvalidValue, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    const T* xp = static_cast<const T*>(x);
    const W* wp = static_cast<const W*>(weight);
    T* yp = static_cast<T*>(y);
    const int ni = static_cast<int>(n);
    if (vectorisable<T, W>(n, weight, {x, y}))
      return launch_fwd<T, W, 16 / sizeof(T)>(xp, wp, yp, rstd, rows, ni, eps, offset,
                                              cast_before_weight, stream);
    return launch_fwd<T, W, 1>(xp, wp, yp, rstd, rows, ni, eps, offset, cast_before_weight,
                               stream);
  });
}

int64_t rms_norm_bwd_blocks(int64_t rows, int64_t n, DType x_dtype, DType weight_dtype,
                            int sm_count) {
  if (rows <= 0 || n <= 0 || n > INT_MAX / 2) return rows > 0 ? 1 : 0;
  return dispatch(x_dtype, weight_dtype, int64_t{1}, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    constexpr int V = 16 / sizeof(T);
    // sized for the packed kernel; misaligned pointers fall back to packs of one, which runs
    // correctly on any number of blocks
    return n % V == 0 ? bwd_grid<T, W, V>(rows, static_cast<int>(n), sm_count)
                      : bwd_grid<T, W, 1>(rows, static_cast<int>(n), sm_count);
  });
}

cudaError_t rms_norm_bwd(const void* dy, const void* x, const void* weight, const float* rstd,
                         void* dx, float* dw_partial, int64_t rows, int64_t n, int64_t blocks,
                         float offset, bool cast_before_weight, DType x_dtype,
                         DType weight_dtype, cudaStream_t stream) {
  if (n <= 0 || n > INT_MAX / 2 || rows < 0 || blocks < 0 || blocks > INT_MAX ||
      (rows > 0 && blocks == 0))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch(x_dtype, weight_dtype, cudaErrorInvalidValue, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    const T* dyp = static_cast<const T*>(dy);
    const T* xp = static_cast<const T*>(x);
    const W* wp = static_cast<const W*>(weight);
    T* dxp = static_cast<T*>(dx);
    const int ni = static_cast<int>(n);
    if (vectorisable<T, W>(n, weight, {dy, x, dx}))
      return launch_bwd<T, W, 16 / sizeof(T)>(dyp, xp, wp, rstd, dxp, dw_partial, rows, ni,
                                              blocks, offset, cast_before_weight, stream);
    return launch_bwd<T, W, 1>(dyp, xp, wp, rstd, dxp, dw_partial, rows, ni, blocks, offset,
                               cast_before_weight, stream);
  });
}

}  // namespace fusetune
