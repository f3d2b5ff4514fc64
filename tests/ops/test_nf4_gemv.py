"""Fused NF4 dequantise + small-M matmul (nf4_gemv) against float64 and dequantise-then-matmul.

The truth is x.double() @ W.double().T with W the fp32 dequantised weight (fusetune.reference),
compared with the per-dtype tolerance of tests/numerics.py. bf16/fp16 results carry one rounding of
the weight to x's dtype (tl.dot paths) and one of the output; the interpreter rounds bf16 by hand
(its casts truncate) and runs tl.dot in fp32 on operands rounded as on the GPU, so no looser band
is needed there. A one-hot x reads single weights back: those must equal dequantize_nf4 bit for
bit, which pins the absmax arithmetic (double quantisation included) to the dequant kernel's.
"""
import pytest
import torch

from fusetune import ops
from fusetune.backend import use_backend
from fusetune.quant import dequantize_nf4, quantize_nf4
from fusetune.reference import nf4 as ref
from fusetune.triton_kernels.nf4_gemv import GemvConfig, nf4_gemv, nf4_gemv_config
from tests.helpers import BACKENDS, on_backend
from tests.numerics import TOLERANCE, assert_close, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K): K % 64 == 0 with K % 128 != 0 (192: blocksize 128 takes the unaligned path), K not a
# multiple of 64 (100), odd K (97: rows start mid-byte), N not a multiple of any block_n
SHAPES = [(1, 1000, 192), (3, 1000, 192), (16, 67, 256), (1, 33, 100), (3, 33, 100), (16, 17, 97)]


def _weight(n, k, blocksize, nested, device):
    packed, state = quantize_nf4(torch.randn(n, k, device=device), blocksize, nested)
    return packed, state


def _gemv(x, packed, state, config=None):
    n, k = state.shape
    return nf4_gemv(x, packed, state.absmax, state.code, state.blocksize, n, k, state.nested_absmax,
                    state.nested_code, state.offset, state.nested_blocksize, config=config)


def _dense64(packed, state):
    return ref.dequantize_nf4(packed, dtype=torch.float32, **state.op_args()).double()


def _truth(x, packed, state):
    return x.double() @ _dense64(packed, state).T


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(shape, blocksize, nested, dtype, device, poison):
    m, n, k = shape
    packed, state = _weight(n, k, blocksize, nested, device)
    x = torch.randn(m, k, device=device).to(dtype)
    out = _gemv(x, packed, state)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, _truth(x, packed, state), dtype, f"nf4_gemv {shape} bs={blocksize} nested={nested}")


# launch configs the heuristic may not pick on these shapes: split-K (even, uneven, more splits than
# K tiles), the weight as tl.dot's right operand, tl.dot at M == 1, block_k below / above the
# blocksize, a K tail in the aligned path (K % block_k != 0), pipelining stages
CONFIGS = [
    GemvConfig(block_n=16, block_k=64, split_k=2),
    GemvConfig(block_n=32, block_k=128, split_k=3, w_lhs=False),
    GemvConfig(block_n=16, block_k=32, split_k=64, num_warps=2),
    GemvConfig(block_n=64, block_k=128, num_warps=8, num_stages=2),
    GemvConfig(block_n=16, block_k=256, split_k=2, use_dot=False),
    GemvConfig(block_n=8, block_k=32, split_k=5, use_dot=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(1, 40, 320), (4, 40, 320), (1, 9, 98)])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_configs(config, shape, nested, dtype, device, poison):
    m, n, k = shape
    if not config.use_dot and m != 1:
        pytest.skip("use_dot=False is the M == 1 path")
    packed, state = _weight(n, k, 64, nested, device)
    x = torch.randn(m, k, device=device).to(dtype)
    out = _gemv(x, packed, state, config)
    assert_close(out, _truth(x, packed, state), dtype, f"nf4_gemv {shape} {config}")


@pytest.mark.parametrize("config", [None, GemvConfig(16, 64, split_k=3), GemvConfig(16, 64, split_k=2, use_dot=False)],
                         ids=str)
@pytest.mark.parametrize("shape", [(128, 192), (33, 101)])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_reads_weights_bit_exact(config, shape, nested, dtype, device, poison):
    n, k = shape
    packed, state = _weight(n, k, 64, nested, device)
    m = 1 if config is not None and not config.use_dot else 16
    cols = torch.randperm(k, device=device)[:m]
    x = torch.zeros(m, k, device=device, dtype=dtype)
    x[torch.arange(m, device=device), cols] = 1
    with use_backend("torch"):
        w = dequantize_nf4(packed, state, out_dtype=dtype)
    out = _gemv(x, packed, state, config)
    assert torch.equal(out, w[:, cols].T), f"max diff {(out.float() - w[:, cols].T.float()).abs().max()}"


def test_split_k_deterministic(device):
    packed, state = _weight(48, 512, 64, True, device)
    x = torch.randn(5, 512, device=device, dtype=torch.bfloat16)
    config = GemvConfig(16, 64, split_k=4)
    assert torch.equal(_gemv(x, packed, state, config), _gemv(x, packed, state, config))


def test_empty_m(device):
    packed, state = _weight(8, 64, 64, False, device)
    assert _gemv(torch.randn(0, 64, device=device), packed, state).shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [100, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_forward_and_input_gradient(backend, m, k, dtype, device):
    """ops.nf4_gemv on every backend: out = x W^T and dx = dy W (W frozen) against float64; more
    rows than the kernels' 16 (and, on the CUDA backend, K not a multiple of 32) go through the
    dequantise op and a matmul."""
    packed, state = _weight(33, k, 64, True, device)
    x = torch.randn(m, k, device=device).to(dtype).requires_grad_()
    with on_backend(backend):
        out = ops.nf4_gemv(x, packed, **state.op_args())
        dy = torch.randn_like(out)
        (dx,) = torch.autograd.grad(out, x, dy)
    assert out.dtype == dtype and dx.dtype == dtype
    assert_close(out, _truth(x, packed, state), dtype, f"ops.nf4_gemv {backend} M={m}")
    assert_close(dx, dy.double() @ _dense64(packed, state), dtype, f"ops.nf4_gemv dx {backend} M={m}")


def test_op_errors():
    packed, state = _weight(8, 64, 64, False, "cpu")
    with pytest.raises(ValueError, match=r"x must be \(M, K\) with K the weight's in-features"):
        ops.nf4_gemv(torch.randn(2, 32), packed, **state.op_args())
    with pytest.raises(ValueError, match=r"x must be \(M, K\)"):
        ops.nf4_gemv(torch.randn(64), packed, **state.op_args())


def test_heuristic_fills_an_h100():
    for m in (1, 4, 16):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)):
            cfg = nf4_gemv_config(m, n, k, 64, 132)
            programs = -(-n // cfg.block_n) * cfg.split_k
            assert k % cfg.block_k == 0 and cfg.use_dot == (m > 1)
            # 2 programs per SM, or as close as the partial-sum budget and block_n >= 16 allow
            assert programs >= 2 * 132 or cfg.block_n == 16, (m, n, k, cfg)
            assert 8 * m * n * cfg.split_k <= n * k / 2 / 8 or cfg.split_k == 1, (m, n, k, cfg)


def test_errors():
    packed, state = _weight(8, 64, 64, True, "cpu")
    x = torch.randn(2, 64)
    args = (packed, state.absmax, state.code, 64, 8, 64)
    nested = (state.nested_absmax, state.nested_code, state.offset)
    with pytest.raises(ValueError, match="2-D"):
        nf4_gemv(x[0], *args, *nested)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        nf4_gemv(x.double(), *args, *nested)
    with pytest.raises(ValueError, match="contiguous"):
        nf4_gemv(torch.randn(64, 2).T, *args, *nested)
    with pytest.raises(ValueError, match="M = 17 rows > 16"):
        nf4_gemv(torch.randn(17, 64), *args, *nested)
    with pytest.raises(ValueError, match="x has 64 columns, W has k = 32"):
        nf4_gemv(x, packed, state.absmax, state.code, 64, 16, 32, *nested)
    with pytest.raises(ValueError, match="packed must be torch.uint8"):
        nf4_gemv(x, packed.to(torch.int8), *args[1:], *nested)
    with pytest.raises(ValueError, match="packed must hold 256 elements, got 255"):
        nf4_gemv(x, packed[:-1], *args[1:], *nested)
    with pytest.raises(ValueError, match="absmax must be torch.float32"):
        nf4_gemv(x, *args)  # uint8 (double-quantised) absmax without its nested state
    with pytest.raises(ValueError, match="together"):
        nf4_gemv(x, *args, state.nested_absmax, state.nested_code)
    with pytest.raises(ValueError, match="blocksize must be a power of 2"):
        nf4_gemv(x, packed, state.absmax, state.code, 48, 8, 64, *nested)
    with pytest.raises(ValueError, match="code must hold 16"):
        nf4_gemv(x, packed, state.absmax, state.code[:8], 64, 8, 64, *nested)
    with pytest.raises(ValueError, match="use_dot=False handles M == 1 only"):
        nf4_gemv(x, *args, *nested, config=GemvConfig(16, 64, use_dot=False))
    with pytest.raises(ValueError, match="block_k >= 32"):
        nf4_gemv(x, *args, *nested, config=GemvConfig(16, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336)])
def test_llama8b_mlp_bf16(m, shape):
    """Llama-3.1-8B gate/up (14336 x 4096) and down (4096 x 14336), double-quantised, bf16 x."""
    n, k = shape
    packed, state = quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 64, True)
    with use_backend("torch"):
        w = dequantize_nf4(packed, state)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = _gemv(x, packed, state)
    expected = x @ w.T
    assert_close(out, expected, torch.bfloat16, f"nf4_gemv M={m} {shape} vs dequantise-then-matmul")
    truth = x.double() @ w.double().T  # the same bf16 weight: ours must be as close as torch's
    assert rel_err(out, truth) <= max(2 * rel_err(expected, truth), TOLERANCE[torch.bfloat16] / 4)
    cols = torch.randperm(k, device="cuda")[:16]
    one_hot = torch.zeros(16, k, device="cuda", dtype=torch.bfloat16)
    one_hot[torch.arange(16), cols] = 1
    assert torch.equal(_gemv(one_hot, packed, state), w[:, cols].T)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_llama8b_down_proj_fp16_fp32(m, dtype):
    """The fp16 and fp32 variants (M == 1 path with int32/int64 x words, tl.dot on fp16 / ieee fp32)
    at the down projection's shape against the float64 truth."""
    n, k = 4096, 14336
    packed, state = quantize_nf4(torch.randn(n, k, device="cuda"), 64, True)
    x = torch.randn(m, k, device="cuda").to(dtype)
    assert_close(_gemv(x, packed, state), _truth(x, packed, state), dtype, f"nf4_gemv M={m} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336)])
def test_llama8b_shapes_through_the_op(backend, m, shape):
    """ops.nf4_gemv at Llama-3.1-8B's MLP shapes, double-quantised, bf16 x, on each kernel backend:
    the float64 truth, and single weights read back bit for bit."""
    n, k = shape
    packed, state = quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 64, True)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    with on_backend(backend):
        out = ops.nf4_gemv(x, packed, **state.op_args())
    assert_close(out, _truth(x, packed, state), torch.bfloat16, f"ops.nf4_gemv {backend} M={m} {shape}")
    with use_backend("torch"):
        w = dequantize_nf4(packed, state)
    cols = torch.randperm(k, device="cuda")[:m]
    one_hot = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
    one_hot[torch.arange(m), cols] = 1
    with on_backend(backend):
        assert torch.equal(ops.nf4_gemv(one_hot, packed, **state.op_args()), w[:, cols].T)
