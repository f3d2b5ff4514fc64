"""NF4: quantiser and dequantisation bit-exact against bitsandbytes (CPU), state interop."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from fusetune.backend import use_backend
from fusetune.quant import dequantize_nf4, quantize_nf4, state_from_dict, state_to_dict
from fusetune.quant.nf4 import _quantize_absmax
from fusetune.reference.nf4 import NF4_CODE
from tests.helpers import BACKENDS, on_backend

try:
    import bitsandbytes.functional as F
except ImportError:  # e.g. the GPU machine: only the comparisons with bitsandbytes skip
    F = None
needs_bnb = pytest.mark.skipif(F is None, reason="bitsandbytes is not installed (pip install bitsandbytes)")

SHAPES = [(33, 100), (17, 31), (64, 128), (300, 512)]  # odd totals, short last blocks, > 256 blocks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb(w, blocksize, double_quant):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


@needs_bnb
def test_code_book_matches_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE), F.get_4bit_type("nf4", device="cpu"))


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantiser_bit_exact(shape, blocksize, double_quant, dtype):
    w = torch.randn(shape).to(dtype)
    packed, state = quantize_nf4(w, blocksize, double_quant)
    ref, ref_state = _bnb(w, blocksize, double_quant)
    assert torch.equal(packed, ref)
    assert torch.equal(state.absmax, ref_state.absmax)
    if double_quant:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
        assert torch.equal(state.nested_code, ref_state.state2.code)


@needs_bnb
def test_nested_absmax_codes_bit_exact_on_many_values():
    # the double quantisation's rounding differs from bitsandbytes' about once per million values
    # when the scale is divided instead of multiplied by its reciprocal: test millions
    absmax = torch.rand(4_000_003) * 3 + 0.5
    codes, nested_absmax, _, offset = _quantize_absmax(absmax)
    ref, ref_state = F.quantize_blockwise(absmax - offset, blocksize=256)
    assert torch.equal(nested_absmax, ref_state.absmax)
    assert torch.equal(codes, ref)


@needs_bnb
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant_bit_exact(backend, shape, blocksize, double_quant, out_dtype, poison):
    w = torch.randn(shape) * 3
    packed, qs = _bnb(w, blocksize, double_quant)
    # fp32 and bf16: bitsandbytes' own output. fp16: its fp32 output rounded to nearest even;
    # bitsandbytes 0.50.2's CPU fp16 output is 1 ulp off that in rare elements
    qs.dtype = torch.float32 if out_dtype == torch.float16 else out_dtype
    expected = F.dequantize_4bit(packed, qs).to(out_dtype)
    qs.dtype = out_dtype
    # bitsandbytes' own state, through its keys; the Triton kernel runs on the GPU where there is one
    device = "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"
    state = state_from_dict(qs.as_dict(packed=True), device=device)
    with on_backend(backend):
        got = dequantize_nf4(packed.to(device), state)
    assert got.dtype == out_dtype and got.shape == torch.Size(shape)
    assert torch.equal(got.cpu(), expected)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_safetensors_both_ways(tmp_path, double_quant):
    # rows of whole blocks: bitsandbytes 0.50's CPU dequantisation mis-blocks even-width rows
    # that are not (it disagrees with its own quantiser there)
    w = torch.randn(40, 128, dtype=torch.bfloat16)
    packed, state = quantize_nf4(w, 64, double_quant)
    # fusetune -> file -> bitsandbytes
    save_file({"weight": packed, **{f"weight.{k}": v for k, v in state_to_dict(state).items()}},
              tmp_path / "ft.safetensors")
    loaded = load_file(tmp_path / "ft.safetensors")
    qs = F.QuantState.from_dict({k[7:]: v for k, v in loaded.items() if k != "weight"}, torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(loaded["weight"], qs), dequantize_nf4(packed, state))
    # bitsandbytes -> file -> fusetune, identical bytes either way
    ref, ref_state = _bnb(w, 64, double_quant)
    theirs = ref_state.as_dict(packed=True)
    save_file({"weight": ref, **{f"weight.{k}": v for k, v in theirs.items()}}, tmp_path / "bnb.safetensors")
    loaded = load_file(tmp_path / "bnb.safetensors")
    state2 = state_from_dict({k: v for k, v in loaded.items() if k != "weight"})
    assert torch.equal(dequantize_nf4(loaded["weight"], state2), F.dequantize_4bit(ref, ref_state))
    ours = state_to_dict(state)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_errors():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(8, 8), blocksize=48)
    with pytest.raises(ValueError, match="cast first"):
        quantize_nf4(torch.randn(8, 8, dtype=torch.float64))
    packed, state = quantize_nf4(torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"out must be contiguous \(8, 8\) torch.bfloat16"):
        dequantize_nf4(packed, state, torch.bfloat16, out=torch.empty(8, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_llama8b_mlp_bf16(double_quant, backend):
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    packed, state = quantize_nf4(w, 64, double_quant)
    with on_backend(backend):
        got = dequantize_nf4(packed, state)
    with use_backend("torch"):
        expected = dequantize_nf4(packed, state)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_workspace_dequantisation_of_several_shapes(backend, device):
    """NF4Weight.dequantize(workspace=True): weights of different shapes take turns in one shared
    buffer (grown for a larger one) and each comes out whole and exact, every time."""
    from fusetune.quant.nf4 import NF4Weight

    weights = [torch.randn(shape, device=device) for shape in ((64, 96), (32, 64), (128, 96), (64, 96))]
    quantised = [NF4Weight(*quantize_nf4(w)) for w in weights]
    with on_backend(backend):
        for _ in range(2):
            for q in quantised:
                got = q.dequantize(torch.float32, workspace=True)
                assert got.shape == q.shape
                assert torch.equal(got, q.dequantize(torch.float32))
        # after the largest weight, every shape is a view of one buffer, the same tensor each time
        results = [q.dequantize(torch.float32, workspace=True) for q in quantised]
        assert len({r.untyped_storage().data_ptr() for r in results}) == 1
        assert results[0] is results[3]
    with torch.inference_mode():  # a buffer first made here still serves training afterwards
        NF4Weight(*quantize_nf4(torch.randn(256, 96, device=device))).dequantize(torch.float16, workspace=True)
    with on_backend(backend):
        got = quantised[0].dequantize(torch.float16, workspace=True)
    assert torch.equal(got, quantised[0].dequantize(torch.float16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blocksize", [2, 4, 8, 32])
@pytest.mark.parametrize("numel", [1, 7, 37, 101])
@pytest.mark.parametrize("nested", [False, True])
def test_dequant_of_small_blocks_and_odd_lengths(backend, blocksize, numel, nested, device):
    """Blocks smaller than a kernel's word of bytes, and data ending inside one: every element against the
    reference (random codes and scales, so any power-of-two blocksize, not only the quantiser's)."""
    from fusetune.ops import nf4_dequant
    from fusetune.reference.nf4 import dequantize_nf4 as reference

    gen = torch.Generator().manual_seed(numel * blocksize)
    blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), generator=gen, dtype=torch.uint8)
    scales = dict(absmax=torch.rand(blocks, generator=gen) + 0.5)
    if nested:
        scales = dict(absmax=torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8),
                      nested_absmax=torch.rand(-(-blocks // 256), generator=gen) + 0.5,
                      nested_code=torch.linspace(-1, 1, 256), offset=torch.tensor(0.25))
    scales = {k: v.to(device) for k, v in scales.items()}
    want = reference(packed.to(device), blocksize=blocksize, shape=(numel,), dtype=torch.float32, **scales)
    with on_backend(backend):
        got = nf4_dequant(packed.to(device), blocksize=blocksize, shape=(numel,), dtype=torch.float32, **scales)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        nf4_dequant(packed.to(device), blocksize=6, shape=(numel,), dtype=torch.float32, **scales)
