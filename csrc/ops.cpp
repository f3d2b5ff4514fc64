// Torch bindings of the CUDA kernels: the torch.ops.fusetune.* schemas (TORCH_LIBRARY, the one
// place that defines them), their CUDA implementations, shape-only Meta implementations (so
// torch.compile and fake tensors can trace through the ops), and, when built as the Python
// extension fusetune._C, an empty module whose import loads all of it.
//
// The kernels (csrc/*.cu, declared in kernels.h) see raw pointers; this file checks what they
// assume (device, dtype, shape, contiguity), with messages that name the problem and the fix.
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (at::cuda's is the same)
#include <torch/library.h>

#include "kernels.h"

namespace {

fusetune::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return fusetune::DType::kFloat16;
    case at::kBFloat16:
      return fusetune::DType::kBFloat16;
    default:
      return fusetune::DType::kFloat32;
  }
}

// t on a CUDA device, the one of the op's first operand `ref` (named ref_name in the message), contiguous
void check_on_gpu(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                  const char* ref_name = "x") {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " on ",
              ref.device(), "; move both to one device");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

// x: (rows, n) contiguous float32/float16/bfloat16 with 0 < n < 2^30
void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, n), got shape ", x.sizes(),
              "; reshape it to (-1, n)");
  check_on_gpu(x, x, op, "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.size(1) > 0 && x.size(1) <= (int64_t{1} << 30), op,
              ": rows of x must have 1 to 2^30 elements, got ", x.size(1));
}

// weight: (n,), of x's dtype or float32
void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  check_on_gpu(weight, x, op, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight of shape ",
              weight.sizes(), " does not match x of shape ", x.sizes(), "; it must be (",
              x.size(1), ",)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, op,
              ": weight must have x's dtype (", x.scalar_type(), ") or float32, got ",
              weight.scalar_type(), "; cast it with weight.to(x.dtype)");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// outputs a kernel writes element by element, each read first by the same thread: an output may
// be one of the inputs exactly (in place), never a part of one, nor overlap itself or another output
// (as ATen's own in-place ops: interleaved views it cannot judge, such as the halves of a fused
// gate_up projection, pass)
void check_outputs(const char* op, std::initializer_list<const at::Tensor*> outputs,
                   std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* out : outputs) {
    TORCH_CHECK(at::has_internal_overlap(*out) != at::MemOverlap::Yes, op,
                ": an output overlaps itself (an expanded tensor?); pass a fresh tensor");
    for (const at::Tensor* in : inputs) {
      const auto status = at::get_overlap_status(*out, *in);
      TORCH_CHECK(status != at::MemOverlapStatus::Partial &&
                      (status != at::MemOverlapStatus::Full || out->strides() == in->strides()),
                  op, ": an output partly overlaps an input; write into the input itself or into a fresh tensor");
    }
    for (const at::Tensor* other : outputs) {
      const auto status = at::get_overlap_status(*out, *other);
      TORCH_CHECK(other == out || (status != at::MemOverlapStatus::Partial && status != at::MemOverlapStatus::Full),
                  op, ": two outputs overlap; pass distinct tensors");
    }
  }
}

int sm_count(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return count;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps, double offset,
                                                bool cast_before_weight) {
  const char* op = "fusetune::rms_norm_fwd";
  check_x(x, op);
  check_weight(weight, x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check_launch(fusetune::rms_norm_fwd(x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                                      rstd.data_ptr<float>(), rows, n, static_cast<float>(eps),
                                      static_cast<float>(offset), cast_before_weight,
                                      kernel_dtype(x), kernel_dtype(weight),
                                      c10::cuda::getCurrentCUDAStream()),
               op);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const at::Tensor& weight,
                                                const at::Tensor& rstd, double offset,
                                                bool cast_before_weight) {
  const char* op = "fusetune::rms_norm_bwd";
  check_x(x, op);
  check_weight(weight, x, op);
  check_on_gpu(dy, x, op, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op,
              ": dy must match x (shape ", x.sizes(), ", ", x.scalar_type(), "), got shape ",
              dy.sizes(), ", ", dy.scalar_type());
  check_on_gpu(rstd, x, op, "rstd");
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == x.size(0) && rstd.scalar_type() == at::kFloat,
              op, ": rstd must be the float32 (", x.size(0), ",) tensor from rms_norm_fwd, got ",
              rstd.scalar_type(), " of shape ", rstd.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  const auto x_dtype = kernel_dtype(x), w_dtype = kernel_dtype(weight);
  const int64_t blocks = fusetune::rms_norm_bwd_blocks(rows, n, x_dtype, w_dtype, sm_count(x));
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_partial = at::empty({blocks, n}, x.options().dtype(at::kFloat));
  check_launch(fusetune::rms_norm_bwd(dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                      rstd.data_ptr<float>(), dx.data_ptr(),
                                      dw_partial.data_ptr<float>(), rows, n, blocks,
                                      static_cast<float>(offset), cast_before_weight, x_dtype,
                                      w_dtype, c10::cuda::getCurrentCUDAStream()),
               op);
  return {dx, dw_partial.sum(0)};  // (0, n) sums to zeros when there are no rows
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_meta(const at::Tensor& x, const at::Tensor&,
                                                     double, double, bool) {
  return {at::empty_like(x), at::empty({x.size(0)}, x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_meta(const at::Tensor&, const at::Tensor& x,
                                                     const at::Tensor&, const at::Tensor&,
                                                     double, bool) {
  return {at::empty_like(x), at::empty({x.size(1)}, x.options().dtype(at::kFloat))};
}

void check_nf4_input(const at::Tensor& t, const at::Tensor& packed, at::ScalarType dtype, int64_t numel,
                     const char* name, const char* op) {
  check_on_gpu(t, packed, op, name, "packed");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() >= numel, op, ": ", name, " has ", t.numel(), " elements; the weight needs ", numel);
}

// an NF4 weight of n elements (bitsandbytes' layout): the packed codes and their absmax, plain or
// double-quantised; true when double-quantised
bool check_nf4_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                      const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                      const std::optional<at::Tensor>& offset, int64_t nested_blocksize, int64_t n, const char* op) {
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0, op, ": blocksize must be even, got ", blocksize);
  TORCH_CHECK(nested_blocksize >= 1, op, ": nested_blocksize must be positive, got ", nested_blocksize);
  check_nf4_input(packed, packed, at::kByte, (n + 1) / 2, "packed", op);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(nested == nested_code.has_value() && nested == offset.has_value(), op,
              ": give nested_absmax, nested_code and offset together (double quantisation) or none");
  check_nf4_input(absmax, packed, nested ? at::kByte : at::kFloat, blocks, "absmax", op);
  check_nf4_input(code, packed, at::kFloat, 16, "code", op);
  if (nested) {
    check_nf4_input(*nested_absmax, packed, at::kFloat, (blocks + nested_blocksize - 1) / nested_blocksize,
                    "nested_absmax", op);
    check_nf4_input(*nested_code, packed, at::kFloat, 256, "nested_code", op);
    check_nf4_input(*offset, packed, at::kFloat, 1, "offset", op);
  }
  return nested;
}

const float* optional_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

void nf4_dequant(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                 int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                 const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                 int64_t nested_blocksize, at::Tensor& out) {
  const char* op = "fusetune::nf4_dequant";
  check_on_gpu(out, packed, op, "out", "packed");
  const auto dt = out.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": out must be float32, float16 or bfloat16, got ", dt);
  check_nf4_weight(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize,
                   out.numel(), op);
  const c10::cuda::CUDAGuard guard(packed.device());
  check_launch(fusetune::nf4_dequant(packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(),
                                     optional_ptr(nested_absmax), optional_ptr(nested_code), optional_ptr(offset),
                                     out.data_ptr(), out.numel(), static_cast<int>(blocksize),
                                     static_cast<int>(nested_blocksize), kernel_dtype(out),
                                     c10::cuda::getCurrentCUDAStream()),
               op);
}

// x (m, k) @ W^T written into out (m, n), for an NF4 weight W of shape (n, k), in x's dtype; the shapes of
// fusetune::nf4_gemv_supported (the op dequantises and multiplies for others)
void nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
              int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
              const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
              int64_t nested_blocksize, at::Tensor& out) {
  const char* op = "fusetune::nf4_gemv";
  check_x(x, op);
  const int64_t m = x.size(0), k = x.size(1), n = out.dim() == 2 ? out.size(1) : -1;
  check_on_gpu(out, x, op, "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.scalar_type() == x.scalar_type(), op,
              ": out must be (", m, ", n) of x's dtype, got ", out.sizes(), " ", out.scalar_type());
  check_nf4_weight(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize, n * k, op);
  TORCH_CHECK(blocksize <= INT32_MAX && nested_blocksize <= INT32_MAX &&
                  fusetune::nf4_gemv_supported(m, k, static_cast<int>(blocksize), packed.data_ptr()),
              op, ": takes 1 to ", fusetune::kNf4GemvMaxM, " rows, in-features and blocksize multiples of 32 and "
              "packed codes on 16 bytes; got x ", x.sizes(), ", blocksize ", blocksize,
              " (use fusetune.ops.nf4_gemv, which dequantises and multiplies for other shapes)");
  check_outputs(op, {&out}, {&x});
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(fusetune::nf4_gemv(x.data_ptr(), packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(),
                                  optional_ptr(nested_absmax), optional_ptr(nested_code), optional_ptr(offset),
                                  out.data_ptr(), m, n, k, static_cast<int>(blocksize),
                                  static_cast<int>(nested_blocksize), kernel_dtype(x),
                                  c10::cuda::getCurrentCUDAStream()),
               op);
}

void nf4_gemv_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                   const std::optional<at::Tensor>&, int64_t, at::Tensor&) {}

void nf4_dequant_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, int64_t, at::Tensor&) {}


fusetune::Activation glu_activation(const std::string& name, const char* op) {
  if (name == "silu") return fusetune::Activation::kSilu;
  if (name == "gelu_tanh") return fusetune::Activation::kGeluTanh;
  TORCH_CHECK(name == "gelu_erf", op, ": activation must be silu, gelu_tanh or gelu_erf, got ", name);
  return fusetune::Activation::kGeluErf;
}

// a (rows, cols) operand of the GLU: on x's device, x's shape and dtype, unit column stride
void check_glu_operand(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), op, ": ", name, " must be a CUDA tensor on ",
              x.device(), ", got one on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.sizes() == x.sizes(), op, ": ", name, " must be 2-D like gate (",
              x.sizes(), "), got shape ", t.sizes(), "; reshape it to (-1, n)");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but gate is ",
              x.scalar_type(), "; cast both to one dtype");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.numel() == 0 || t.size(1) == 1 || t.stride(1) == 1, op, ": ", name, " must have unit column stride (strides ",
              t.strides(), "); pass ", name, ".contiguous()");
}

// act(gate) * up written into y
void glu_fwd(const at::Tensor& gate, const at::Tensor& up, const std::string& activation, at::Tensor& y) {
  const char* op = "fusetune::glu_fwd";
  const auto act = glu_activation(activation, op);
  check_glu_operand(gate, gate, op, "gate");
  check_glu_operand(up, gate, op, "up");
  check_glu_operand(y, gate, op, "y");
  check_outputs(op, {&y}, {&gate, &up});
  const c10::cuda::CUDAGuard guard(gate.device());
  check_launch(fusetune::glu_fwd(gate.data_ptr(), up.data_ptr(), y.data_ptr(), gate.size(0), gate.size(1),
                                 gate.stride(0), up.stride(0), y.stride(0), act, kernel_dtype(gate),
                                 c10::cuda::getCurrentCUDAStream()),
               op);
}

// the gradients written into dgate and dup (which may be gate and up themselves)
void glu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up, const std::string& activation,
             at::Tensor& dgate, at::Tensor& dup) {
  const char* op = "fusetune::glu_bwd";
  const auto act = glu_activation(activation, op);
  check_glu_operand(gate, gate, op, "gate");
  check_glu_operand(dy, gate, op, "dy");
  check_glu_operand(up, gate, op, "up");
  check_glu_operand(dgate, gate, op, "dgate");
  check_glu_operand(dup, gate, op, "dup");
  check_outputs(op, {&dgate, &dup}, {&dy, &gate, &up});
  const c10::cuda::CUDAGuard guard(gate.device());
  check_launch(fusetune::glu_bwd(dy.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(), dup.data_ptr(),
                                 gate.size(0), gate.size(1), dy.stride(0), gate.stride(0), up.stride(0),
                                 dgate.stride(0), dup.stride(0), act, kernel_dtype(gate),
                                 c10::cuda::getCurrentCUDAStream()),
               op);
}

void glu_fwd_meta(const at::Tensor&, const at::Tensor&, const std::string&, at::Tensor&) {}

void glu_bwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::string&, at::Tensor&,
                  at::Tensor&) {}

// q or k (batch, heads, seq, head_dim) and where its result goes
fusetune::RopeTensor rope_operand(const at::Tensor& x, const at::Tensor& out) {
  return {x.data_ptr(), out.data_ptr(), x.size(1), x.stride(0), x.stride(2), x.stride(1),
          out.stride(0), out.stride(2), out.stride(1)};
}

void check_rope_operand(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), op, ": ", name, " must be a CUDA tensor on ", q.device(),
              ", got one on ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(2) == q.size(2) && t.size(3) == q.size(3), op,
              ": ", name, " must be (batch, heads, seq, head_dim) with q's batch, seq and head_dim (q is ",
              q.sizes(), "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but q is ",
              q.scalar_type(), "; cast them to one dtype");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name, "'s last dim must have stride 1 (strides ",
              t.strides(), "); pass ", name, ".contiguous()");
}

void check_rope_table(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), op, ": ", name, " must be a CUDA tensor on ", q.device(),
              ", got one on ", t.device());
  TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == q.size(0)) && t.size(1) == q.size(2), op, ": ",
              name, " must be (batch or 1, seq, rot_dim) for q ", q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(2) >= 2 && t.size(2) % 2 == 0 && t.size(2) <= q.size(3), op, ": the rotary dim (", name,
              "'s last) must be even and between 2 and head_dim=", q.size(3), ", got ", t.size(2));
  TORCH_CHECK(t.stride(2) == 1, op, ": ", name, "'s last dim must have stride 1; pass ", name, ".contiguous()");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

// q, k (batch, heads, seq, head_dim) rotated into q_out, k_out (which may be q, k); inverse: the
// transposed rotation (the backward)
void rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool inverse,
          at::Tensor& q_out, at::Tensor& k_out) {
  const char* op = "fusetune::rope";
  check_rope_operand(q, q, op, "q");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  check_rope_operand(k, q, op, "k");
  check_rope_operand(q_out, q, op, "q_out");
  check_rope_operand(k_out, q, op, "k_out");
  TORCH_CHECK(q_out.size(1) == q.size(1) && k_out.size(1) == k.size(1), op,
              ": q_out and k_out must have q's and k's head counts");
  check_rope_table(cos, q, op, "cos");
  check_rope_table(sin, q, op, "sin");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(), op,
              ": cos and sin must have one shape and dtype, got ", cos.sizes(), " ", cos.scalar_type(), " and ",
              sin.sizes(), " ", sin.scalar_type());
  TORCH_CHECK(q.size(0) <= 65535 && q.size(2) <= INT32_MAX, op, ": batch must be at most 65535 and seq below 2^31, got ",
              q.sizes());
  check_outputs(op, {&q_out, &k_out}, {&q, &k, &cos, &sin});
  const int64_t rot_dim = cos.size(2);
  const bool in_place = q_out.is_same(q) && k_out.is_same(k);
  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(fusetune::rope(rope_operand(q, q_out), rope_operand(k, k_out), cos.data_ptr(), sin.data_ptr(),
                              q.size(0), q.size(2), q.size(3), rot_dim, cos.size(0) > 1 ? cos.stride(0) : 0,
                              cos.stride(1), sin.size(0) > 1 ? sin.stride(0) : 0, sin.stride(1), inverse,
                              rot_dim < q.size(3) && !in_place, kernel_dtype(q), kernel_dtype(cos),
                              c10::cuda::getCurrentCUDAStream()),
               op);
}

void rope_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, at::Tensor&,
               at::Tensor&) {}

// logits (rows, V) with unit column stride; targets (rows,) int64, any stride
void check_logits(const at::Tensor& x, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": logits must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, op, ": logits must be 2-D (rows, vocab) with a vocab, got shape ",
              x.sizes(), "; reshape them to (-1, vocab)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.size(1) == 1 || x.stride(1) == 1, op, ": logits must have unit column stride (strides ", x.strides(),
              "); pass logits.contiguous()");
  TORCH_CHECK(x.size(0) <= INT32_MAX, op, ": at most 2^31 - 1 rows, got ", x.size(0));
  TORCH_CHECK(targets.is_cuda() && targets.device() == x.device(), op, ": targets must be on the logits' device (",
              x.device(), "), got ", targets.device());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == x.size(0) && targets.scalar_type() == at::kLong, op,
              ": targets must be int64 of shape (", x.size(0), ",), got ", targets.scalar_type(), " of shape ",
              targets.sizes(), "; pass targets.long()");
}

// the rows' losses and log-sum-exps written into loss and lse, float32 (rows,)
void cross_entropy_fwd(const at::Tensor& x, const at::Tensor& targets, int64_t ignore_index, double scale,
                       double softcap, at::Tensor& loss, at::Tensor& lse) {
  const char* op = "fusetune::cross_entropy_fwd";
  check_logits(x, targets, op);
  TORCH_CHECK(softcap >= 0, op, ": softcap must be > 0 (0 for none), got ", softcap);
  for (const auto* t : {&loss, &lse}) {
    check_on_gpu(*t, x, op, "loss and lse", "logits");
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0) && t->scalar_type() == at::kFloat, op,
                ": loss and lse must be float32 (", x.size(0), ",), got ", t->scalar_type(), " of shape ", t->sizes());
  }
  check_outputs(op, {&loss, &lse}, {&x, &targets});
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(fusetune::cross_entropy_fwd(x.data_ptr(), targets.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                           lse.data_ptr<float>(), x.size(0), x.size(1), x.stride(0),
                                           targets.stride(0), ignore_index, static_cast<float>(scale),
                                           static_cast<float>(softcap), kernel_dtype(x),
                                           c10::cuda::getCurrentCUDAStream()),
               op);
}

// the logits' gradient written into dx (which may be x itself); grad: the per-row scale, fp32 (rows,)
// of any stride (0: one value for every row)
void cross_entropy_bwd(const at::Tensor& x, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad,
                       int64_t ignore_index, double scale, double softcap, at::Tensor& dx) {
  const char* op = "fusetune::cross_entropy_bwd";
  check_logits(x, targets, op);
  TORCH_CHECK(softcap >= 0, op, ": softcap must be > 0 (0 for none), got ", softcap);
  check_on_gpu(lse, x, op, "lse", "logits");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == x.size(0) && lse.scalar_type() == at::kFloat, op,
              ": lse must be the float32 (", x.size(0), ",) tensor from cross_entropy_fwd, got ", lse.scalar_type(),
              " of shape ", lse.sizes());
  TORCH_CHECK(grad.is_cuda() && grad.device() == x.device() && grad.dim() == 1 && grad.size(0) == x.size(0) &&
                  grad.scalar_type() == at::kFloat,
              op, ": grad must be a float32 (", x.size(0), ",) CUDA tensor on the logits' device, got ",
              grad.scalar_type(), " of shape ", grad.sizes(), " on ", grad.device());
  TORCH_CHECK(dx.is_cuda() && dx.device() == x.device() && dx.sizes() == x.sizes() &&
                  dx.scalar_type() == x.scalar_type() && (dx.size(1) == 1 || dx.stride(1) == 1),
              op, ": dx must match the logits (", x.sizes(), ", ", x.scalar_type(), ", unit column stride), got ",
              dx.sizes(), ", ", dx.scalar_type());
  check_outputs(op, {&dx}, {&x, &targets, &lse, &grad});
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(fusetune::cross_entropy_bwd(x.data_ptr(), dx.data_ptr(), targets.data_ptr<int64_t>(),
                                           lse.data_ptr<float>(), grad.data_ptr<float>(), x.size(0), x.size(1),
                                           x.stride(0), dx.stride(0), targets.stride(0), grad.stride(0),
                                           ignore_index, static_cast<float>(scale), static_cast<float>(softcap),
                                           kernel_dtype(x), c10::cuda::getCurrentCUDAStream()),
               op);
}

void cross_entropy_fwd_meta(const at::Tensor&, const at::Tensor&, int64_t, double, double, at::Tensor&,
                            at::Tensor&) {}

void cross_entropy_bwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            double, double, at::Tensor&) {}
}  // namespace

TORCH_LIBRARY(fusetune, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps, float offset, "
        "bool cast_before_weight) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, float offset, "
        "bool cast_before_weight) -> (Tensor, Tensor)");
  m.def("nf4_dequant(Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor? nested_absmax, "
        "Tensor? nested_code, Tensor? offset, int nested_blocksize, Tensor(a!) out) -> ()");
  m.def("glu_fwd(Tensor gate, Tensor up, str activation, Tensor(a!) y) -> ()");
  m.def("glu_bwd(Tensor dy, Tensor gate, Tensor up, str activation, Tensor(a!) dgate, Tensor(b!) dup) -> ()");
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse, Tensor(a!) q_out, Tensor(b!) k_out) -> ()");
  m.def("cross_entropy_fwd(Tensor x, Tensor targets, int ignore_index, float scale, float softcap, Tensor(a!) loss, "
        "Tensor(b!) lse) -> ()");
  m.def("nf4_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor? nested_absmax, "
        "Tensor? nested_code, Tensor? offset, int nested_blocksize, Tensor(a!) out) -> ()");
  m.def("cross_entropy_bwd(Tensor x, Tensor targets, Tensor lse, Tensor grad, int ignore_index, float scale, "
        "float softcap, Tensor(a!) dx) -> ()");
}

TORCH_LIBRARY_IMPL(fusetune, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("nf4_dequant", &nf4_dequant);
  m.impl("glu_fwd", &glu_fwd);
  m.impl("glu_bwd", &glu_bwd);
  m.impl("rope", &rope);
  m.impl("nf4_gemv", &nf4_gemv);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
}

TORCH_LIBRARY_IMPL(fusetune, Meta, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_meta);
  m.impl("rms_norm_bwd", &rms_norm_bwd_meta);
  m.impl("nf4_dequant", &nf4_dequant_meta);
  m.impl("glu_fwd", &glu_fwd_meta);
  m.impl("glu_bwd", &glu_bwd_meta);
  m.impl("rope", &rope_meta);
  m.impl("nf4_gemv", &nf4_gemv_meta);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_meta);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_meta);
}

#ifdef TORCH_EXTENSION_NAME  // defined by torch's extension builders, not by CMakeLists.txt
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusetune CUDA kernels; importing this module registers torch.ops.fusetune.*";
}
#endif
