import functools

import torch
import torch.nn.functional as F

# The GLU activations by the names fusetune uses from the patching specs down to the kernels, each
# with its PyTorch definition. The one list of them: ops, lora and patching validate against it.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_erf": F.gelu,
}


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, act named in ACTIVATIONS, computed in fp32 (float64 stays float64), one
    rounding to gate's dtype."""
    compute = torch.promote_types(gate.dtype, torch.float32)
    return (ACTIVATIONS[activation](gate.to(compute)) * up.to(compute)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, as glu."""
    return glu(gate, up, "silu")
