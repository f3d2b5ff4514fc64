"""Compile every Triton kernel fusetune launches ahead of time for Hopper (sm_90), on any machine.

Run as a script in a process with TRITON_INTERPRET unset (tests/ops/test_aot_sm90.py does that). It
drives the public ops, forward and backward, on small CPU tensors with the Triton backend; every
kernel launch is captured instead of run, and each distinct (kernel, argument types, constexprs,
num_warps) is compiled with triton.compile for GPUTarget("cuda", 90, 32). Prints one line per
kernel variant and exits non-zero if any fails to build.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fusetune.backend  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
         torch.uint8: "u8", torch.bool: "i1"}
captured = {}


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if not -2**31 <= value < 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return "constexpr"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _capture(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    signature, constexprs = {}, {}
    for i, param in enumerate(self.params):
        value = bound.get(param.name, param.default)
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _arg_type(value)
    key = (self.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
    captured[key] = (self, signature, constexprs, options)


def _capture_autotuned(self, *args, **kwargs):
    for config in self.configs:
        merged = {**kwargs, **config.all_kwargs()}
        self.fn.run(*args, **merged)


def drive_ops():
    """Forward and backward of every op on CPU tensors (never launched) at real Llama-3.1-8B widths
    and odd ones, in bf16 and fp32, so the block sizes and warps of real runs get compiled."""
    from fusetune import ops

    for dtype in (torch.bfloat16, torch.float32):
        for hidden, head_dim, inter, vocab in ((4096, 128, 14336, 128256), (1000, 64, 333, 32003)):
            x = torch.randn(3, hidden, dtype=dtype, requires_grad=True)
            w = torch.ones(hidden, dtype=dtype, requires_grad=True)
            for variant in ("llama", "gemma"):
                ops.rms_norm(x, w, 1e-6, variant).sum().backward()
            q = torch.randn(1, 32, 3, head_dim, dtype=dtype, requires_grad=True)
            k = torch.randn(1, 8, 3, head_dim, dtype=dtype, requires_grad=True)
            for rotary in (head_dim, head_dim // 2):
                cos, sin = torch.randn(1, 3, rotary, dtype=dtype), torch.randn(1, 3, rotary, dtype=dtype)
                sum(t.sum() for t in ops.rope(q, k, cos, sin)).backward()
            gate = torch.randn(3, inter, dtype=dtype, requires_grad=True)
            up = torch.randn(3, inter, dtype=dtype, requires_grad=True)
            ops.swiglu(gate, up).sum().backward()
            # Phi-3's fused gate_up_proj: strided halves take the tiled kernels
            ops.swiglu(*torch.randn(3, 2 * inter, dtype=dtype, requires_grad=True).chunk(2, -1)).sum().backward()
            for approximate in ("tanh", "none"):
                ops.geglu(gate, up, approximate=approximate).sum().backward()
            logits = torch.randn(3, vocab, dtype=dtype, requires_grad=True)
            targets = torch.randint(0, vocab, (3,))
            for kwargs in ({}, {"softcap": 30.0, "logit_scale": 0.5}, {"reduction": "none"}):
                ops.cross_entropy(logits, targets, **kwargs).sum().backward()
            ops.linear_cross_entropy(x, torch.randn(vocab, hidden, dtype=dtype), targets[:1].expand(3)).backward()
    # flash attention: the plain and packed causal Llama shapes, and Gemma-2's softcap + window at head dim 256
    for heads, kv_heads, head_dim, options in ((32, 8, 128, dict()),
                                                (32, 8, 128, dict(segment_ids=torch.zeros(1, 3, dtype=torch.long))),
                                                (8, 4, 256, dict(softcap=50.0, window=4096))):
        q, k, v = (torch.randn(1, h, 3, head_dim, dtype=torch.bfloat16, requires_grad=True)
                   for h in (heads, kv_heads, kv_heads))
        ops.attention(q, k, v, **options).sum().backward()
    from fusetune.quant import dequantize_nf4, quantize_nf4

    for double_quant in (False, True):
        packed, state = quantize_nf4(torch.randn(64, 256), blocksize=64, double_quant=double_quant)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            dequantize_nf4(packed, state, out_dtype=dtype)
    from fusetune.triton_kernels.nf4_gemv import nf4_gemv

    # the fused NF4 matmul at the 8B MLP shapes, plain and double-quantised (uninitialised data is
    # fine: nothing runs), with the configs the heuristic picks for an H100
    for n, k in ((14336, 4096), (4096, 14336)):
        packed, blocks = torch.empty(n * k // 2, dtype=torch.uint8), n * k // 64
        nested = (torch.empty(-(-blocks // 256)), torch.empty(256), torch.empty(1))
        for m, dtype in ((1, torch.bfloat16), (16, torch.bfloat16), (4, torch.float16), (4, torch.float32)):
            x, code = torch.empty(m, k, dtype=dtype), torch.empty(16)
            nf4_gemv(x, packed, torch.empty(blocks), code, 64, n, k)
            nf4_gemv(x, packed, torch.empty(blocks, dtype=torch.uint8), code, 64, n, k, *nested)


def main() -> int:
    JITFunction.run = _capture
    Autotuner.run = _capture_autotuned
    fusetune.backend.triton_interpreting = lambda: True  # let the ops pick Triton for CPU tensors
    with fusetune.backend.use_backend("triton"):
        drive_ops()
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for (name, _, consts, _), (fn, signature, constexprs, options) in sorted(captured.items(), key=str):
        dtypes = sorted({t for t in signature.values() if t.startswith("*")})
        label = f"{name} {','.join(dtypes)} {dict(consts)} {options}"
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
            print(f"ok   {label}: {kernel.metadata.num_warps} warps, {kernel.metadata.shared} B shared")
        except Exception as err:  # report every failure, then fail
            failed += 1
            print(f"FAIL {label}: {type(err).__name__}: {str(err)[:2000]}")
    print(f"{len(captured)} kernel variants, {failed} failed")
    return 1 if failed or not captured else 0


if __name__ == "__main__":
    sys.exit(main())
