"""The CUDA C++ fallback (csrc/): the kernels compile with plain nvcc (CPU tier), and the
extension's ops match the float64 reference (GPU tier).

GPU tier: uses the installed fusetune._C, else builds csrc/ just in time (about a minute).
"""
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusetune import backend, rms_norm, use_backend
from fusetune.ops.rms_norm import CUDA_OPS
from fusetune.reference.rms_norm import rms_norm as reference
from tests.helpers import check_rms_norm_against_float64
from tests.numerics import assert_close, leaf

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNELS = sorted(CSRC.glob("*.cu"))
# the flags torch's extension builders add (setup.py's CUDAExtension, JIT load), so the CPU tier
# also catches code that would lean on the half/bfloat16 operators they switch off
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


@pytest.mark.slow
@pytest.mark.parametrize("source", KERNELS, ids=[p.name for p in KERNELS])
def test_kernel_compiles_with_plain_nvcc(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: install a CUDA toolkit to compile csrc/*.cu")
    cmd = [nvcc, "-c", "-arch=sm_90", "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, str(source),
           "-o", str(tmp_path / (source.stem + ".o"))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"


def _nvcc_include_flags(nvcc: str) -> list[str]:
    """The include flags nvcc gives its host compiler (the CUDA toolkit's headers)."""
    done = subprocess.run([nvcc, "-v", "-E", "-x", "cu", "/dev/null", "-o", "/dev/null"], capture_output=True,
                          text=True, timeout=60)
    flags = []
    for line in done.stderr.splitlines():
        if line.startswith(("#$ INCLUDES=", "#$ SYSTEM_INCLUDES=")):
            flags += shlex.split(line.split("=", 1)[1])
    return flags


@pytest.mark.slow
def test_bindings_compile_against_the_installed_torch(tmp_path):
    """csrc/ops.cpp, the torch bindings (built only where torch has CUDA), type-checks against this
    torch's headers: a binding mistake shows on the CPU machines, not first on a GPU."""
    from torch.utils.cpp_extension import include_paths

    nvcc, gxx = shutil.which("nvcc"), shutil.which("g++")
    if nvcc is None or gxx is None:
        pytest.skip("needs nvcc (a CUDA toolkit) and g++ to check csrc/ops.cpp")
    # the one header of torch's CUDA build that a CPU build lacks; ops.cpp needs only its macro
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    # after torch's own include paths, so a CUDA build of torch uses its real header
    cmd = [gxx, "-std=c++20", "-fsyntax-only", *(f"-I{p}" for p in include_paths()), f"-I{tmp_path}",
           *_nvcc_include_flags(nvcc), f"-I{CSRC}", str(CSRC / "ops.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-5000:]}"


def test_kernels_stay_torch_free():
    # setup.py and CMakeLists.txt build csrc/*.cu + ops.cpp; the kernels must stay torch-free
    assert KERNELS, "no csrc/*.cu found"
    for path in [*KERNELS, CSRC / "kernels.h"]:
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{path.name} includes {banned}: keep kernels torch-free"


@pytest.fixture(scope="module")
def cuda_ext():
    """fusetune._C, installed or (failing that) built from csrc/ just in time."""
    assert backend.build_cuda_extension() is not None
    assert all(hasattr(torch.ops.fusetune, op) for op in CUDA_OPS)


@pytest.mark.gpu
def test_backend_lists_the_extension_ops(cuda_ext):
    # a fresh process, where no torch.ops.fusetune.<op> has been looked up yet
    if backend.cuda_extension().__name__ != "fusetune._C":
        pytest.skip("fusetune._C is not installed (built just in time here): a fresh process "
                    "cannot see it")
    code = ("import torch; from fusetune.backend import resolve, use_backend; "
            "from fusetune.ops.rms_norm import CUDA_OPS\n"
            "with use_backend('cuda'): assert resolve('rms_norm', torch.device('cuda'), CUDA_OPS) == 'cuda'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# odd n (1000, 1001, 5001) take the one-element path; 5001 and 40000 are longer than the
# registers hold, so part of each row is re-read (and dw accumulated in the partial buffer)
SHAPES = [(4096, 4096), (17, 1000), (3, 5, 7, 128), (9, 1001), (2, 3, 8192), (4, 5001), (3, 40000)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_float64_reference(cuda_ext, variant, dtype, shape):
    check_rms_norm_against_float64("cuda", variant, dtype, shape, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_weight_with_half_input(cuda_ext, dtype):
    # gemma keeps x's dtype for y whatever the weight's; weights kept in fp32 (mixed precision)
    x = leaf(torch.randn(33, 520, device="cuda", dtype=dtype))
    w = leaf(torch.randn(520, device="cuda") * 0.2)
    with use_backend("cuda"):
        y = rms_norm(x, w, 1e-6, "gemma")
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = leaf(x.double()), leaf(w.double())
    y64 = reference(x64, w64, 1e-6, "gemma")
    y64.backward(dy.double())
    assert y.dtype == dtype and w.grad.dtype == torch.float32
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    assert_close(w.grad, w64.grad, dtype, "dw")


@pytest.mark.gpu
def test_misaligned_rows_take_the_scalar_path(cuda_ext):
    # a view that starts one element in: 16-byte loads would be misaligned
    base = torch.randn(17 * 256 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(17, 256)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    y, rstd = torch.ops.fusetune.rms_norm_fwd(x, w, 1e-6, 0.0, True)
    assert_close(y, reference(x.double(), w.double(), 1e-6, "llama"), torch.bfloat16, "y")
    assert_close(rstd, x.double().pow(2).mean(-1).add(1e-6).rsqrt(), torch.float32, "rstd")


@pytest.mark.gpu
def test_empty_rows(cuda_ext):
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    y, rstd = torch.ops.fusetune.rms_norm_fwd(x, w, 1e-6, 0.0, True)
    dx, dw = torch.ops.fusetune.rms_norm_bwd(x, x, w, rstd, 0.0, True)
    assert y.shape == (0, 64) and rstd.shape == (0,) and dx.shape == (0, 64)
    assert torch.equal(dw, torch.zeros(64, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("bad, message", [
    (lambda x, w: (x.t(), w), "contiguous"),
    (lambda x, w: (x, w[:32]), r"must be \(64,\)"),
    (lambda x, w: (x, w.half()), "weight must have x's dtype"),
    (lambda x, w: (x.int(), w), "float32, float16 or bfloat16"),
    (lambda x, w: (x.cpu(), w), "CUDA tensor"),
    (lambda x, w: (x[None], w), "2-D"),
])
def test_bad_inputs_name_the_problem(cuda_ext, bad, message):
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fusetune.rms_norm_fwd(*bad(x, w), 1e-6, 0.0, True)
