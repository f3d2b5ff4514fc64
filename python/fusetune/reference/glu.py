import torch
import torch.nn.functional as F


def _compute_dtype(gate: torch.Tensor) -> torch.dtype:
    return torch.promote_types(gate.dtype, torch.float32)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 (float64 stays float64), one rounding to gate's dtype."""
    compute = _compute_dtype(gate)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate, approximate) * up ("tanh" or "none" = exact erf), computed as swiglu is."""
    compute = _compute_dtype(gate)
    return (F.gelu(gate.to(compute), approximate=approximate) * up.to(compute)).to(gate.dtype)
