"""GLUs (SwiGLU, GeGLU): autograd Function over the Triton kernels or the CUDA extension's ops, and
`glu`, `swiglu`, `geglu`.

Activations are named as in fusetune.reference.glu.ACTIVATIONS ("silu", "gelu_tanh", "gelu_erf")
everywhere inside fusetune; HF_ACTIVATIONS maps transformers' names to them.
"""
import math

import torch

from fusetune.backend import CUDA_DTYPES, resolve
from fusetune.reference import glu as reference
from fusetune.reference.glu import ACTIVATIONS

# transformers' ACT2FN name (config.hidden_act / hidden_activation) -> the activation computing the
# same function; the names missing here get no fused MLP
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu_erf",
    "gelu_python": "gelu_erf",
}
GELU_APPROXIMATIONS = {"tanh": "gelu_tanh", "none": "gelu_erf"}  # geglu's approximate -> activation

CUDA_OPS = ("glu_fwd", "glu_bwd")  # the torch.ops.fusetune operators of the CUDA path


def check_activation(where: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def op_name(activation: str) -> str:
    """The op an activation's GLU is known as ("swiglu" | "geglu"): backend choice, logs, the patch
    summary."""
    return "swiglu" if activation == "silu" else "geglu"


def _check(op: str, gate: torch.Tensor, up: torch.Tensor):
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the "
                         f"same shape")
    if gate.device != up.device:
        raise ValueError(f"{op}: gate is on {gate.device} but up on {up.device}; move both to one "
                         f"device")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate is {gate.dtype} but up is {up.dtype}; cast both to one dtype")
    if not gate.is_floating_point():
        raise TypeError(f"{op}: gate and up must be floating tensors, got {gate.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, n) view with unit column stride; copies only when no such view exists."""
    n = t.shape[-1] if t.dim() else 1
    t2d = t.reshape(math.prod(t.shape[:-1]), n)
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


def backend_for(activation: str, gate: torch.Tensor) -> str:
    """The backend ("triton" | "cuda" | "torch") that runs this activation's GLU on gate's device
    and dtype (up's are the same)."""
    return resolve(op_name(activation), gate.device, CUDA_OPS, gate.dtype in CUDA_DTYPES)


def glu_forward(gate, up, activation: str, backend: str) -> torch.Tensor:
    """act(gate) * up outside autograd, for fused Functions that own their backward (lora_mlp) and
    for GLUFunction; gate and up: (rows, n) with unit column stride. A new contiguous tensor."""
    if backend == "cuda":
        y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        torch.ops.fusetune.glu_fwd(gate, up, activation, y)
        return y
    if backend == "triton":
        from fusetune.triton_kernels.glu import glu_fwd

        return glu_fwd(gate, up, activation)
    return reference.glu(gate, up, activation)


def glu_backward(dy, gate, up, activation: str, backend: str, out=None):
    """(d gate, d up) outside autograd; all (rows, n) with unit column stride. out: where to write
    them, which may be (gate, up) themselves (each element is read before its gradient is stored)."""
    if backend == "triton":
        from fusetune.triton_kernels.glu import glu_bwd

        return glu_bwd(dy, gate, up, activation, out=out)
    if backend == "cuda":
        if out is None:
            out = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
                   torch.empty(up.shape, dtype=up.dtype, device=up.device))
        torch.ops.fusetune.glu_bwd(dy, gate, up, activation, *out)
        return out
    with torch.enable_grad():
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        grads = torch.autograd.grad(reference.glu(g, u, activation), (g, u), dy)
    if out is None:
        return grads
    out[0].copy_(grads[0])
    out[1].copy_(grads[1])
    return out


class GLUFunction(torch.autograd.Function):
    """act(gate) * up on the Triton or CUDA kernels; saves gate and up only: the backward
    recomputes act from gate."""

    @staticmethod
    def forward(ctx, gate, up, activation, backend):
        y = glu_forward(_rows(gate), _rows(up), activation, backend)
        ctx.save_for_backward(gate, up)
        ctx.activation, ctx.backend = activation, backend
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = glu_backward(_rows(dy), _rows(gate), _rows(up), ctx.activation, ctx.backend)
        return dg.view(gate.shape), du.view(up.shape), None, None


def _glu(op: str, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    _check(op, gate, up)
    backend = backend_for(activation, gate)
    if backend == "torch":
        return reference.glu(gate, up, activation)
    return GLUFunction.apply(gate, up, activation, backend)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, computed in fp32, in gate's dtype; activation: "silu" (SwiGLU: Llama,
    Mistral, Qwen, Phi-3 MLPs), "gelu_tanh" or "gelu_erf" (GeGLU: Gemma MLPs).

    gate and up: same shape (any leading dims), dtype and device; they may be strided views, e.g.
    the halves of a fused gate_up projection (gate_up.chunk(2, dim=-1)), read without a copy.
    Differentiable in gate and up.
    """
    check_activation("glu", activation)
    return _glu("glu", gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: `glu` with activation "silu"."""
    return _glu("swiglu", gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate, approximate) * up: `glu` with activation "gelu_tanh" (approximate "tanh") or
    "gelu_erf" ("none", exact erf), approximate as in torch.nn.functional.gelu."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be 'tanh' or 'none' (as in "
                         f"torch.nn.functional.gelu), got {approximate!r}")
    return _glu("geglu", gate, up, GELU_APPROXIMATIONS[approximate])
