// Launchers of the CUDA kernels, shared by ops.cpp (the torch bindings) and the .cu files.
//
// Nothing here includes torch: the kernels take raw device pointers, sizes and a stream, so the
// .cu files build with plain nvcc (CI compiles them where no CUDA build of torch exists).
// Tensors are row-major: contiguous unless a launcher takes strides (in elements). Each launcher returns the launch's cudaError_t, or
// cudaErrorInvalidValue for a dtype pair or size it does not support (ops.cpp checks those first,
// with messages that name the problem).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusetune {

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

// The GLU activations, as fusetune.reference.glu.ACTIVATIONS names them.
enum class Activation : int { kSilu, kGeluTanh, kGeluErf };

// RMSNorm over the last dim of x (rows, n); w' = weight + offset.
//   rstd = 1 / sqrt(mean(x^2) + eps), xhat = x * rstd, y = xhat * w'
// cast_before_weight rounds xhat to x's dtype before the product (Llama); else fp32 (Gemma).
// y has x's dtype; rstd is (rows,) fp32. weight is x's dtype or float32.
cudaError_t rms_norm_fwd(const void* x, const void* weight, void* y, float* rstd, int64_t rows,
                         int64_t n, float eps, float offset, bool cast_before_weight,
                         DType x_dtype, DType weight_dtype, cudaStream_t stream);

// Blocks of the backward's persistent grid (as many as fit on the current device at once, at most
// one per row): the rows of the fp32 dw partial buffer (blocks, n) that rms_norm_bwd fills. The
// caller sums that buffer over dim 0 to get dw.
int64_t rms_norm_bwd_blocks(int64_t rows, int64_t n, DType x_dtype, DType weight_dtype,
                            int sm_count);

// Backward, with g = dy * w':  dx = rstd * (g - xhat * mean(g * xhat)),
//   dw_partial[b] = sum over block b's rows of dy * xhat (xhat rounded to x's dtype when
//   cast_before_weight). dy, x and dx share x's dtype; every row of dw_partial is written.
cudaError_t rms_norm_bwd(const void* dy, const void* x, const void* weight, const float* rstd,
                         void* dx, float* dw_partial, int64_t rows, int64_t n, int64_t blocks,
                         float offset, bool cast_before_weight, DType x_dtype,
                         DType weight_dtype, cudaStream_t stream);

// NF4 dequantisation of bitsandbytes' 4-bit format into out (n_elements of out_dtype): packed
// holds two codes per byte (first element in the high nibble); absmax is fp32 per block of
// blocksize elements, or, when nested_absmax is not null, uint8 codes into nested_code (256 fp32)
// scaled by nested_absmax (fp32 per nested_blocksize blocks) plus *offset (device fp32).
cudaError_t nf4_dequant(const uint8_t* packed, const void* absmax, const float* code,
                        const float* nested_absmax, const float* nested_code, const float* offset,
                        void* out, int64_t n_elements, int blocksize, int nested_blocksize,
                        DType out_dtype, cudaStream_t stream);

// GLU (SwiGLU, GeGLU) over (rows, cols) tensors of one dtype with unit column stride and the
// given row strides (elements): y = act(gate) * up, in fp32 with one rounding.
cudaError_t glu_fwd(const void* gate, const void* up, void* y, int64_t rows, int64_t cols,
                    int64_t gate_row_stride, int64_t up_row_stride, int64_t y_row_stride,
                    Activation activation, DType dtype, cudaStream_t stream);

// Its backward, act recomputed from gate: dgate = dy * up * act'(gate), dup = dy * act(gate).
// dgate and dup may be gate and up themselves (each element is read before it is overwritten).
cudaError_t glu_bwd(const void* dy, const void* gate, const void* up, void* dgate, void* dup,
                    int64_t rows, int64_t cols, int64_t dy_row_stride, int64_t gate_row_stride,
                    int64_t up_row_stride, int64_t dgate_row_stride, int64_t dup_row_stride,
                    Activation activation, DType dtype, cudaStream_t stream);

// RoPE (Hugging Face's rotate_half) of q (batch, q_heads, seq, head_dim) and k (batch, k_heads,
// seq, head_dim) of one dtype, unit last stride, any other strides (elements), into q_out/k_out
// (which may be q/k: in place). cos/sin (batch or 1, seq, rot_dim) of cos_dtype with unit last
// stride, cos_batch_stride 0 to share one row over the batch. Over the first rot_dim dims of every
// head, h = rot_dim / 2: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; the rest copied when copy_pass.
// inverse applies the transposed rotation ((s1, s2) -> (-s2, -s1)): the backward.
struct RopeTensor {
  const void* x;
  void* out;
  int64_t heads, batch_stride, seq_stride, head_stride, out_batch_stride, out_seq_stride, out_head_stride;
};
cudaError_t rope(const RopeTensor& q, const RopeTensor& k, const void* cos, const void* sin,
                 int64_t batch, int64_t seq, int64_t head_dim, int64_t rot_dim, int64_t cos_batch_stride,
                 int64_t cos_seq_stride, int64_t sin_batch_stride, int64_t sin_seq_stride, bool inverse,
                 bool copy_pass, DType dtype, DType cos_dtype, cudaStream_t stream);

// Cross-entropy of the rows of x (rows, n_cols) of x_dtype, unit column stride, against int64
// targets (stride t_stride): z = softcap tanh(scale x / softcap) (softcap 0: z = scale x),
// lse = log sum exp z, loss = lse - z_target, both fp32 (rows,); 0 for both where the target is
// ignore_index, a NaN loss for a target outside [0, n_cols).
cudaError_t cross_entropy_fwd(const void* x, const int64_t* targets, float* loss, float* lse, int64_t rows,
                              int64_t n_cols, int64_t x_row_stride, int64_t t_stride, int64_t ignore_index,
                              float scale, float softcap, DType x_dtype, cudaStream_t stream);

// Its backward with g = grad[row * g_stride] (fp32; g_stride 0 shares one value):
//   dx = g (exp(z - lse) - [j == target]) dz/dx, zero on ignored rows; dx (of x's dtype) may be x.
cudaError_t cross_entropy_bwd(const void* x, void* dx, const int64_t* targets, const float* lse, const float* grad,
                              int64_t rows, int64_t n_cols, int64_t x_row_stride, int64_t dx_row_stride,
                              int64_t t_stride, int64_t g_stride, int64_t ignore_index, float scale, float softcap,
                              DType x_dtype, cudaStream_t stream);

// NF4 dequantise + small-M matmul: out (m, n) = x (m, k) @ W^T in x's dtype, W (n, k) in the format
// of nf4_dequant (same absmax arguments), never materialised; x and out contiguous, fp32 sums.
// Takes 1 <= m <= kNf4GemvMaxM, k a multiple of 32, blocksize a multiple of 32 and packed on
// 16 bytes (nf4_gemv_supported); cudaErrorInvalidValue otherwise.
constexpr int kNf4GemvMaxM = 16;
bool nf4_gemv_supported(int64_t m, int64_t k, int blocksize, const void* packed);
cudaError_t nf4_gemv(const void* x, const uint8_t* packed, const void* absmax, const float* code,
                     const float* nested_absmax, const float* nested_code, const float* offset, void* out,
                     int64_t m, int64_t n, int64_t k, int blocksize, int nested_blocksize, DType dtype,
                     cudaStream_t stream);

}  // namespace fusetune
