// Gated-MLP activations (SwiGLU, GeGLU), forward and backward: the CUDA C++ path of
// triton_kernels/glu.py, with the same formulas (fp32 math, one rounding per output):
//   y = act(g) * u;   dg = dy * u * act'(g),   du = dy * act(g)   (act recomputed from g)
// with s = sigmoid:
//   silu:      act = g s(g),  act' = s(g) (1 + g (1 - s(g)))
//   gelu_tanh: p = s(2 c (g + k g^3)) (c = sqrt(2/pi), k = 0.044715), act = g p,
//              act' = p + 2 g p (1 - p) c (1 + 3 k g^2)        (0.5 (1 + tanh v) = s(2v))
//   gelu_erf:  cdf = 0.5 (1 + erf(g / sqrt 2)), act = g cdf,  act' = cdf + g exp(-g^2/2) / sqrt(2 pi)
//
// Tensors are (rows, cols) with unit column stride and a row stride each, so the halves of a
// fused gate_up projection are read in place; tensors that are all contiguous are one row of
// rows * cols elements. Each block takes tiles of one row, kThreads * kVec elements; a thread
// loads and stores kVec elements with one 16-byte access each where every pointer and row stride
// allows it, else one element at a time.
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "kernels.h"

namespace fusetune {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride past this: enough to fill any GPU

__device__ __forceinline__ float sigmoid_of(float v) {
  return 1.0f / (1.0f + __expf(-v));  // exp -> inf at large -v gives 0, never NaN
}

// act(g), and act'(g) when kGrad
template <Activation A, bool kGrad>
__device__ __forceinline__ float activate(float g, float* dact) {
  if constexpr (A == Activation::kSilu) {
    const float s = sigmoid_of(g);
    if constexpr (kGrad) *dact = s * (1.0f + g * (1.0f - s));
    return g * s;
  } else if constexpr (A == Activation::kGeluTanh) {
    constexpr float c = 0.7978845608028654f, k = 0.044715f;
    const float g2 = g * g;
    const float p = sigmoid_of(2.0f * c * g * (1.0f + k * g2));
    if constexpr (kGrad) *dact = p + 2.0f * g * p * (1.0f - p) * c * (1.0f + 3.0f * k * g2);
    return g * p;
  } else {
    const float cdf = 0.5f * (1.0f + erff(g * 0.7071067811865476f));
    if constexpr (kGrad) *dact = cdf + g * __expf(-0.5f * g * g) * 0.3989422804014327f;
    return g * cdf;
  }
}

// kVec consecutive elements, moved with one access of kVec * sizeof(T) bytes (16 when vectorised)
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// element (row, col) of a tensor with row stride `stride`, as a Pack: indexed in Packs, so that
// the compiler sees the 16-byte alignment and emits one 128-bit store (a Pack* cast of an element
// address is split into 32-bit stores); col and, where row > 0, stride are multiples of kVec
template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load(const T* base, int64_t row, int64_t stride, int64_t col) {
  return reinterpret_cast<const Pack<T, kVec>*>(base)[row * (stride / kVec) + col / kVec];
}

template <typename T, int kVec>
__device__ __forceinline__ void store(T* base, int64_t row, int64_t stride, int64_t col, const Pack<T, kVec>& pack) {
  reinterpret_cast<Pack<T, kVec>*>(base)[row * (stride / kVec) + col / kVec] = pack;
}

// rows x cols elements in tiles of one row each (col_tiles per row)
struct Layout {
  int64_t rows, cols, col_tiles;
};

template <typename T, Activation A, int kVec>
__global__ void __launch_bounds__(kThreads)
    glu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y,
                   Layout layout, int64_t g_stride, int64_t u_stride, int64_t y_stride) {
  constexpr int64_t kTileCols = int64_t{kThreads} * kVec;
  const int64_t tiles = layout.rows * layout.col_tiles;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / layout.col_tiles;
    const int64_t col = (tile % layout.col_tiles) * kTileCols + int64_t{threadIdx.x} * kVec;
    if (col >= layout.cols) continue;  // (cols is a multiple of kVec when kVec > 1)
    const Pack<T, kVec> g = load<T, kVec>(gate, row, g_stride, col);
    const Pack<T, kVec> u = load<T, kVec>(up, row, u_stride, col);
    Pack<T, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out.v[j] = from_float<T>(activate<A, false>(to_float(g.v[j]), nullptr) * to_float(u.v[j]));
    }
    store<T, kVec>(y, row, y_stride, col, out);
  }
}

// dgate/dup may be gate/up themselves (no __restrict__ on those): each element is read before
// its gradient is stored, by the same thread
template <typename T, Activation A, int kVec>
__global__ void __launch_bounds__(kThreads)
    glu_bwd_kernel(const T* __restrict__ dy, const T* gate, const T* up, T* dgate, T* dup,
                   Layout layout, int64_t dy_stride, int64_t g_stride, int64_t u_stride,
                   int64_t dg_stride, int64_t du_stride) {
  constexpr int64_t kTileCols = int64_t{kThreads} * kVec;
  const int64_t tiles = layout.rows * layout.col_tiles;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / layout.col_tiles;
    const int64_t col = (tile % layout.col_tiles) * kTileCols + int64_t{threadIdx.x} * kVec;
    if (col >= layout.cols) continue;
    const Pack<T, kVec> d = load<T, kVec>(dy, row, dy_stride, col);
    const Pack<T, kVec> g = load<T, kVec>(gate, row, g_stride, col);
    const Pack<T, kVec> u = load<T, kVec>(up, row, u_stride, col);
    Pack<T, kVec> dg, du;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float dact;
      const float gj = to_float(g.v[j]), dj = to_float(d.v[j]);
      const float act = activate<A, true>(gj, &dact);
      dg.v[j] = from_float<T>(dj * to_float(u.v[j]) * dact);
      du.v[j] = from_float<T>(dj * act);
    }
    store<T, kVec>(dgate, row, dg_stride, col, dg);
    store<T, kVec>(dup, row, du_stride, col, du);
  }
}

// The layout the tensors share: one row of rows * cols when all are contiguous, and whether
// kVec-wide accesses are aligned everywhere (every pointer on 16 bytes, cols and strides
// multiples of kVec).
template <typename T, int kVec>
bool vectorisable(const void* const* ptrs, const int64_t* strides, int n, int64_t rows, int64_t cols) {
  if (cols % kVec != 0) return false;
  for (int i = 0; i < n; ++i) {
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % (sizeof(T) * kVec) != 0) return false;
    if (rows > 1 && strides[i] % kVec != 0) return false;
  }
  return true;
}

Layout make_layout(int64_t rows, int64_t cols, const int64_t* strides, int n, int64_t tile_cols) {
  bool contiguous = true;
  for (int i = 0; i < n; ++i) contiguous = contiguous && strides[i] == cols;
  if (contiguous) {
    cols *= rows;
    rows = 1;
  }
  return {rows, cols, (cols + tile_cols - 1) / tile_cols};
}

unsigned grid_for(const Layout& layout) {
  const int64_t tiles = layout.rows * layout.col_tiles;
  return static_cast<unsigned>(tiles < kMaxBlocks ? tiles : kMaxBlocks);
}

template <typename T, Activation A>
cudaError_t launch_fwd(const void* gate, const void* up, void* y, int64_t rows, int64_t cols,
                       const int64_t* strides, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const void* ptrs[] = {gate, up, y};
  const bool vec = vectorisable<T, kVec>(ptrs, strides, 3, rows, cols);
  const Layout layout = make_layout(rows, cols, strides, 3, int64_t{kThreads} * (vec ? kVec : 1));
  if (layout.rows * layout.cols == 0) return cudaSuccess;
  const auto* g = static_cast<const T*>(gate);
  const auto* u = static_cast<const T*>(up);
  auto* out = static_cast<T*>(y);
  if (vec) {
    glu_fwd_kernel<T, A, kVec><<<grid_for(layout), kThreads, 0, stream>>>(g, u, out, layout, strides[0],
                                                                         strides[1], strides[2]);
  } else {
    glu_fwd_kernel<T, A, 1><<<grid_for(layout), kThreads, 0, stream>>>(g, u, out, layout, strides[0],
                                                                     strides[1], strides[2]);
  }
  return cudaGetLastError();
}

template <typename T, Activation A>
cudaError_t launch_bwd(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                       int64_t rows, int64_t cols, const int64_t* strides, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const void* ptrs[] = {dy, gate, up, dgate, dup};
  const bool vec = vectorisable<T, kVec>(ptrs, strides, 5, rows, cols);
  const Layout layout = make_layout(rows, cols, strides, 5, int64_t{kThreads} * (vec ? kVec : 1));
  if (layout.rows * layout.cols == 0) return cudaSuccess;
  const auto* d = static_cast<const T*>(dy);
  const auto* g = static_cast<const T*>(gate);
  const auto* u = static_cast<const T*>(up);
  auto* dg = static_cast<T*>(dgate);
  auto* du = static_cast<T*>(dup);
  if (vec) {
    glu_bwd_kernel<T, A, kVec><<<grid_for(layout), kThreads, 0, stream>>>(
        d, g, u, dg, du, layout, strides[0], strides[1], strides[2], strides[3], strides[4]);
  } else {
    glu_bwd_kernel<T, A, 1><<<grid_for(layout), kThreads, 0, stream>>>(
        d, g, u, dg, du, layout, strides[0], strides[1], strides[2], strides[3], strides[4]);
  }
  return cudaGetLastError();
}

// f(std::integral_constant<Activation, A>{}) for the activation's A
template <typename F>
cudaError_t with_activation(Activation activation, F&& f) {
  switch (activation) {
    case Activation::kSilu:
      return f(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGeluTanh:
      return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kGeluErf:
      return f(std::integral_constant<Activation, Activation::kGeluErf>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t glu_fwd(const void* gate, const void* up, void* y, int64_t rows, int64_t cols,
                    int64_t gate_row_stride, int64_t up_row_stride, int64_t y_row_stride,
                    Activation activation, DType dtype, cudaStream_t stream) {
  if (rows < 0 || cols < 0) return cudaErrorInvalidValue;
  const int64_t strides[] = {gate_row_stride, up_row_stride, y_row_stride};
  return with_element_type(dtype, [&](auto type) {
    return with_activation(activation, [&](auto act) {
      return launch_fwd<typename decltype(type)::type, decltype(act)::value>(gate, up, y, rows, cols, strides, stream);
    });
  });
}

cudaError_t glu_bwd(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                    int64_t rows, int64_t cols, int64_t dy_row_stride, int64_t gate_row_stride,
                    int64_t up_row_stride, int64_t dgate_row_stride, int64_t dup_row_stride,
                    Activation activation, DType dtype, cudaStream_t stream) {
  if (rows < 0 || cols < 0) return cudaErrorInvalidValue;
  const int64_t strides[] = {dy_row_stride, gate_row_stride, up_row_stride, dgate_row_stride, dup_row_stride};
  return with_element_type(dtype, [&](auto type) {
    return with_activation(activation, [&](auto act) {
      return launch_bwd<typename decltype(type)::type, decltype(act)::value>(dy, gate, up, dgate, dup, rows, cols,
                                                                            strides, stream);
    });
  });
}

}  // namespace fusetune
