"""Backend registry: which implementation (triton | cuda | torch) runs an op.

The choice comes from, in order: `use_backend(...)` / `set_backend(...)`, then the environment
variable FUSETUNE_BACKEND, then "auto".

auto: CUDA tensors use the CUDA extension for the ops of CUDA_FIRST (measured faster there, end to
end; FUSETUNE_CUDA_FIRST replaces the table) when it is built and takes the inputs, else Triton, else
the extension, else torch; CPU tensors use torch, except under TRITON_INTERPRET=1, where Triton runs
(that is how CI tests the kernels). Only auto falls back, and it logs which backend it picked once
per op and circumstance (device type, Triton installed, TRITON_INTERPRET, the extension built). A
backend asked for by name that cannot run raises BackendUnavailableError naming what is missing.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading

import torch

# the one TRITON_INTERPRET check, kept with the kernels (the lowest layer); resolve() calls it by
# this module's name, so a run that only captures launches (tests/aot_compile.py) can stand in for it
from fusetune.triton_kernels.utils import interpreting as triton_interpreting

BACKENDS = ("auto", "triton", "cuda", "torch")

logger = logging.getLogger("fusetune")
_state = threading.local()


# auto on CUDA tensors: the ops whose CUDA C++ version (csrc/) is faster end to end than Triton's.
# bench/kernels.py at Llama-3.1-8B shapes (H100 80GB, torch 2.11, Triton 3.6, 2026-12-07): forward+
# backward called from Python, as a training step pays it, in ms; the host's share (us per call at 1
# token); the GPU time alone (replayed from a CUDA graph), in ms:
#   op             Triton: called / host / GPU    CUDA: called / host / GPU
#   rms_norm       0.371 / 411 / 0.081            0.211 / 255 / 0.095
#   rope           0.547 / 406 / 0.075            0.304 / 229 / 0.086
#   swiglu         0.316 / 297 / 0.314            0.316 / 246 / 0.314
#   cross_entropy  1.026 / 727 / 1.009            1.044 / 713 / 1.027   (Triton kept)
# The linear cross-entropy's forward (lm_head + loss): Triton 6.66 ms, CUDA 7.77 (Triton kept).
#   nf4_dequant (bench/nf4_dequant.py, 14336 x 4096 -> bf16, double-quantised; H100, 2026-12-07):
#   Triton 0.0626 ms (78% of copy bandwidth), 20.5 us host per call; CUDA 0.0680 ms (72%), 9.8 us.
#   A QLoRA step dequantises every weight three times (forward, recompute, backward): W4 (1B QLoRA
#   2 x 2048) ran at 41,733 tokens/s with the extension against 29,613 with Triton (same call).
# The host saves 150-180 us per call on rms_norm and rope, 50 on swiglu; the GPU loses 11-14 us on
# the two small ops, so where a step is bound by the GPU (8B, long context) it costs ~1-2 ms a step.
# End to end (bench/e2e.py W1, Llama-3.2-1B LoRA 2 x 2048, H100, one run of each in one call):
# 35,607 tokens/s with this table against 28,078 with every op on Triton, the same peak memory.
MEASURED_CUDA_FIRST = frozenset({"rms_norm", "rope", "swiglu", "nf4_dequant"})


def _cuda_first() -> frozenset:
    """The table auto uses: MEASURED_CUDA_FIRST, or FUSETUNE_CUDA_FIRST (comma-separated op names, or
    "none"), read once at import, to measure the table again on another GPU (bench/e2e.py runs)."""
    override = os.environ.get("FUSETUNE_CUDA_FIRST")
    if override is None:
        return MEASURED_CUDA_FIRST
    return frozenset(op for op in override.replace(" ", "").lower().split(",") if op and op != "none")


CUDA_FIRST = _cuda_first()  # fusetune.ops checks the names against its ops
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the CUDA C++ kernels compute in


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run an op here."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fusetune backend {name!r}; choose one of {', '.join(BACKENDS)} "
                         f"(argument or FUSETUNE_BACKEND)")
    return name


def get_backend() -> str:
    """The backend requested now: the innermost use_backend/set_backend, else FUSETUNE_BACKEND."""
    name = getattr(_state, "name", None)
    if name is None:
        name = os.environ.get("FUSETUNE_BACKEND", "auto").strip().lower() or "auto"
    return _check_name(name)


def set_backend(name: str | None) -> None:
    """Request a backend for this thread; None returns to FUSETUNE_BACKEND / auto. A checkpointed
    layer's recompute runs under the request its forward ran under (ops.tiling.ForwardState), on
    whichever thread autograd runs the backward."""
    _state.name = None if name is None else _check_name(name)


def requested_backend() -> str | None:
    """This thread's set_backend / use_backend request (None: none, FUSETUNE_BACKEND or auto rules)."""
    return getattr(_state, "name", None)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager: `with use_backend("torch"): ...` (None: no request, as outside any)."""
    previous = getattr(_state, "name", None)
    set_backend(name)
    try:
        yield
    finally:
        _state.name = previous


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def cuda_extension():
    """The compiled `fusetune._C` module, or None when it was not built."""
    try:
        from fusetune import _C  # noqa: F401  (registers torch.ops.fusetune.*)
    except ImportError:
        return None
    return _C


def build_cuda_extension(verbose: bool = False):
    """Build csrc/ just in time (torch.utils.cpp_extension.load) and register it as fusetune._C.

    For a source checkout whose install skipped the extension (no CUDA toolkit at install time);
    needs a CUDA build of torch and nvcc. Takes about a minute the first time, then torch's
    extension cache makes it quick. Returns the module.
    """
    import sys
    from pathlib import Path

    if cuda_extension() is not None:
        return cuda_extension()
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    if not (csrc / "ops.cpp").is_file():
        raise BackendUnavailableError(f"no CUDA sources at {csrc}: build_cuda_extension needs a source "
                                      f"checkout of fusetune (pip install -e .)")
    if torch.version.cuda is None:
        raise BackendUnavailableError("torch is a CPU build: install a CUDA build of torch to build "
                                      "the CUDA extension")
    from torch.utils.cpp_extension import load

    sources = [str(p) for p in sorted(csrc.glob("*.cu"))] + [str(csrc / "ops.cpp")]
    module = load(name="fusetune_C_jit", sources=sources, verbose=verbose,
                  extra_cflags=["-O3"],  # (the C++ standard: torch's, which its headers need)
                  extra_cuda_cflags=["-O3", "--use_fast_math"])
    sys.modules["fusetune._C"] = module
    cuda_extension.cache_clear()
    logger.info("fusetune: built the CUDA extension just in time from %s", csrc)
    return module


def _why_not(backend: str, device: torch.device, cuda_ops: tuple[str, ...]) -> str | None:
    """None when `backend` can run here, else the reason (with the fix) why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return (f"Triton needs CUDA tensors (got {device.type}); on CPU it runs only under "
                f"TRITON_INTERPRET=1, set before fusetune is imported")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors (got {device.type})"
        if cuda_extension() is None:
            return ("the CUDA extension fusetune._C is not built (reinstall with a CUDA toolkit "
                    "and a CUDA build of torch: FUSETUNE_BUILD_CUDA=1 pip install -e .)")
        if not cuda_ops:
            return "this op has no CUDA C++ implementation yet"
        # torch.ops namespaces resolve their ops lazily: ask for each one by name
        missing = [name for name in cuda_ops if not hasattr(torch.ops.fusetune, name)]
        if missing:
            return f"fusetune._C lacks {', '.join(missing)} (rebuild the extension)"
        return None
    raise AssertionError(backend)


def resolve(op: str, device: torch.device, cuda_ops: tuple[str, ...] = (), cuda_accepts: bool = True) -> str:
    """The backend that runs `op` on tensors of `device`.

    cuda_ops names the torch.ops.fusetune operators the op's CUDA path needs (empty: none);
    cuda_accepts says whether that path takes these inputs (dtypes, layouts): auto passes it over
    when not, a request for "cuda" gets the op's own error.
    """
    requested = get_backend()
    if requested != "auto":
        reason = _why_not(requested, device, cuda_ops)
        if reason is not None:
            raise BackendUnavailableError(f"fusetune backend {requested!r} cannot run {op}: {reason}. "
                                          f"Use FUSETUNE_BACKEND=auto to pick what can run.")
        return requested
    on_cuda = device.type == "cuda"  # the extension is imported only where it could run
    return _auto(op, device.type, tuple(cuda_ops), triton_available(), triton_interpreting(),
                 on_cuda and cuda_extension() is not None, cuda_accepts)


@functools.cache
def _auto(op: str, device_type: str, cuda_ops: tuple[str, ...], triton: bool, interpreting: bool,
          extension: bool, cuda_accepts: bool) -> str:
    """auto's choice, worked out (and logged) once per op and circumstance: resolve runs for every op
    call, thousands of times a training step, and the host time adds up."""
    if device_type == "cuda":
        order = ("cuda", "triton", "torch") if op in CUDA_FIRST else ("triton", "cuda", "torch")
        order = order if cuda_accepts else tuple(b for b in order if b != "cuda")
    else:
        order = ("triton", "torch") if interpreting else ("torch",)
    device = torch.device(device_type)
    chosen = next(b for b in order if _why_not(b, device, cuda_ops) is None)
    logger.info("fusetune: %s on %s uses the %s backend", op, device_type, chosen)
    return chosen
