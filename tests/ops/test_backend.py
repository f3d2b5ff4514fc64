import importlib
import os
import subprocess
import sys

import pytest
import torch

from fusetune import backend, ops
from fusetune.backend import BackendUnavailableError, resolve, use_backend
from fusetune.quant import quantize_nf4
from fusetune.reference import nf4 as nf4_reference
from tests.numerics import assert_close

NF4_KERNELS = {"nf4_dequant": "fusetune.triton_kernels.nf4", "nf4_gemv": "fusetune.triton_kernels.nf4_gemv"}


def test_auto_on_cpu_uses_triton_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what conftest sets on a machine without a GPU
    assert resolve("rms_norm", torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve("rms_norm", torch.device("cpu")) == "torch"


def test_auto_on_cuda_follows_the_measured_table(monkeypatch):
    """On CUDA tensors auto takes the extension first for the ops of CUDA_FIRST, unless it cannot
    take the inputs; Triton first for the rest. (_why_not stands in for a GPU with the extension.)"""
    monkeypatch.setattr(backend, "_why_not", lambda name, device, cuda_ops: None)
    backend._auto.cache_clear()
    try:
        for op in ("rms_norm", "rope", "swiglu", "nf4_dequant"):
            assert op in backend.CUDA_FIRST
            assert backend._auto(op, "cuda", ("op",), True, False, True, True) == "cuda"
            assert backend._auto(op, "cuda", ("op",), True, False, True, False) == "triton"
        assert backend._auto("cross_entropy", "cuda", ("op",), True, False, True, True) == "triton"
    finally:
        backend._auto.cache_clear()


def test_explicit_cuda_backend_on_cpu_names_what_is_missing():
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        resolve("rms_norm", torch.device("cpu"), ("rms_norm_fwd",))


def test_explicit_backend_without_cuda_impl():
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cannot run"):
        resolve("rope", torch.device("cuda"), ())


def test_unknown_backend_name_lists_choices(monkeypatch):
    monkeypatch.setenv("FUSETUNE_BACKEND", "trtion")
    with pytest.raises(ValueError, match="auto, triton, cuda, torch"):
        backend.get_backend()


def test_env_variable_and_context_nesting(monkeypatch):
    monkeypatch.setenv("FUSETUNE_BACKEND", "torch")
    assert backend.get_backend() == "torch"
    with use_backend("triton"):
        assert backend.get_backend() == "triton"
        with use_backend("auto"):
            assert backend.get_backend() == "auto"
        assert backend.get_backend() == "triton"
    assert backend.get_backend() == "torch"


def test_report_covers_every_op():
    from fusetune.ops import OPS
    from fusetune.training.env import backend_report, format_probe, probe

    assert set(NF4_KERNELS) <= set(OPS)
    assert set(backend_report("cpu")) == set(OPS)
    listing = format_probe(probe())  # what `fusetune env` prints
    assert all(f"  {op} " in listing for op in OPS)


def _nf4_op(op: str, device):
    """(the op's output, its reference's) on a small double-quantised weight."""
    packed, state = quantize_nf4(torch.randn(9, 64, device=device), 64, True)
    if op == "nf4_dequant":
        return (ops.nf4_dequant(packed, dtype=torch.float32, **state.op_args()),
                nf4_reference.dequantize_nf4(packed, dtype=torch.float32, **state.op_args()))
    x = torch.randn(2, 64, device=device)
    return ops.nf4_gemv(x, packed, **state.op_args()), nf4_reference.nf4_gemv(x, packed, **state.op_args())


@pytest.mark.parametrize("op", NF4_KERNELS)
@pytest.mark.parametrize("requested", ["auto", "torch"])
def test_nf4_ops_follow_the_backend(op, requested, device, monkeypatch):
    """auto launches the Triton kernel (on a GPU, or under the interpreter as in CI); torch runs the
    reference, even where Triton could run."""
    if device.type == "cpu" and not backend.triton_interpreting():
        pytest.skip("auto runs Triton on CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    kernels = importlib.import_module(NF4_KERNELS[op])
    launcher, launches = getattr(kernels, op), []
    monkeypatch.setattr(kernels, op, lambda *args, **kwargs: launches.append(op) or launcher(*args, **kwargs))
    with use_backend(requested):
        got, want = _nf4_op(op, device)
    assert launches == ([op] if requested == "auto" else [])
    if requested == "torch":
        assert torch.equal(got, want)
    else:
        assert_close(got, want, torch.float32, f"{op} on Triton")


@pytest.mark.parametrize("op", NF4_KERNELS)
@pytest.mark.parametrize("requested, missing", [("cuda", "the CUDA extension needs CUDA tensors"),
                                                ("triton", "Triton needs CUDA tensors")])
def test_nf4_ops_explicit_backend_that_cannot_run_raises(op, requested, missing, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no Triton either
    with use_backend(requested), pytest.raises(BackendUnavailableError, match=f"cannot run {op}: {missing}"):
        _nf4_op(op, torch.device("cpu"))


@pytest.mark.parametrize("value, expected", [("rms_norm, NF4_dequant", "['nf4_dequant', 'rms_norm']"), ("none", "[]")])
def test_cuda_first_table_from_the_environment(value, expected):
    """FUSETUNE_CUDA_FIRST replaces the measured table (read at import: a fresh interpreter)."""
    code = "import fusetune.ops, fusetune.backend as b; print(sorted(b.CUDA_FIRST))"
    env = {**os.environ, "FUSETUNE_CUDA_FIRST": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_cuda_first_table_with_an_unknown_op_names_it():
    env = {**os.environ, "FUSETUNE_CUDA_FIRST": "rms_norm,swiglue"}
    out = subprocess.run([sys.executable, "-c", "import fusetune.ops"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "FUSETUNE_CUDA_FIRST names swiglue, which is not an op" in out.stderr


def test_nf4_scales_the_cuda_op_does_not_take_go_to_triton():
    """auto sends nf4_dequant to the extension only with the scales its checks take (fp32 absmax, or uint8
    codes with fp32 nested scales); others (an fp16 absmax, an fp64 offset) stay on Triton, which reads them."""
    from fusetune.ops.nf4 import cuda_takes_scales

    _, state = quantize_nf4(torch.randn(8, 64), 32, double_quant=False)
    assert cuda_takes_scales(state.absmax, None, None)
    assert not cuda_takes_scales(state.absmax.half(), None, None)
    _, nested = quantize_nf4(torch.randn(8, 64), 32, double_quant=True)
    assert cuda_takes_scales(nested.absmax, nested.nested_absmax, nested.offset)
    assert not cuda_takes_scales(nested.absmax, nested.nested_absmax, nested.offset.double())
