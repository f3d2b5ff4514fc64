"""LoRA projections: the pieces every fused LoRA block is made of.

One projection (PEFT semantics, `lora_B(lora_A(dropout(x))) * scaling` added to the base layer):
    y = x W^T + b + s * (drop(x) A^T) B^T,   drop(x) = x * mask / (1 - p)
with W (out, in) and b frozen (W dense, or 4-bit NF4 and dequantised on use), A (r, in) and
B (out, r) trainable, s the scaling (alpha / r, or alpha / sqrt(r) for rsLoRA). A projection may
have no adapter (A = B = None): a frozen linear inside a block whose other projections train.
Backward, dY the output gradient, every LoRA product bracketed so that only (N, r)
intermediates appear:
    dB = s * dY^T (drop(X) A^T)                 (out, r)
    dA = s * (dY B)^T drop(X)                   (r, in)
    dX = dY W + s * drop^T((dY B) A)            drop^T multiplies by the same mask / (1 - p)
The LoRA products run in the input's dtype; adapters kept in another dtype (PEFT keeps them in
fp32 by default) are cast to it for the products and their gradients cast back.
A group of projections that share one input (q, k, v; gate, up) saves that input once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading

import torch
import torch.nn.functional as F

from fusetune.quant.nf4 import NF4Weight

GEMV_ROWS = 16  # at most this many rows: a 4-bit weight goes through the fused dequantise-GEMV op


@dataclasses.dataclass
class LoRAProjection:
    """One projection with its adapter. weight (out, in), dense or NF4Weight, and bias (out,) are
    frozen; lora_A (r, in) and lora_B (out, r) are trained (both None: no adapter); scaling is
    PEFT's `scaling[adapter]`. dropout is PEFT's lora_dropout p; dropout_mask (bool, the shape of
    this projection's input) fixes the kept elements; None with dropout > 0 draws a fresh
    Bernoulli(1 - p) mask each forward from torch's default generator (so checkpoint's RNG replay
    redraws the same one): the same distribution as nn.Dropout's, not the same bits for a seed."""
    weight: torch.Tensor | NF4Weight
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    bias: torch.Tensor | None = None
    dropout: float = 0.0
    dropout_mask: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def check_projection(where: str, p: LoRAProjection, x: torch.Tensor, in_features: int) -> int:
    """Validate one projection against its input x (..., in_features); returns out_features."""
    dense = isinstance(p.weight, torch.Tensor)
    if not dense and not isinstance(p.weight, NF4Weight):
        raise TypeError(f"{where}.weight must be a tensor or an NF4Weight, got {type(p.weight).__name__}")
    if p.weight.device != x.device:
        raise ValueError(f"{where}.weight is on {p.weight.device} but x on {x.device}; move them to one device")
    if dense and p.weight.dtype != x.dtype:
        raise TypeError(f"{where}.weight is {p.weight.dtype} but x is {x.dtype}; cast the input to the "
                        f"weight's dtype")
    if len(p.weight.shape) != 2 or p.weight.shape[1] != in_features:
        raise ValueError(f"{where}.weight has shape {tuple(p.weight.shape)}; expected (out, {in_features})")
    out = p.weight.shape[0]
    if (p.lora_A is None) != (p.lora_B is None):
        raise ValueError(f"{where}: give both lora_A and lora_B, or neither (a projection without adapter)")
    if p.lora_A is not None:
        for key, t in (("lora_A", p.lora_A), ("lora_B", p.lora_B)):
            if t.device != x.device:
                raise ValueError(f"{where}.{key} is on {t.device} but x on {x.device}; move them to one device")
            if not t.is_floating_point():
                raise TypeError(f"{where}.{key} must be floating point, got {t.dtype}")
        if p.lora_A.dim() != 2 or p.lora_A.shape[1] != in_features:
            raise ValueError(f"{where}.lora_A has shape {tuple(p.lora_A.shape)}; expected (r, {in_features})")
        rank = p.lora_A.shape[0]
        if tuple(p.lora_B.shape) != (out, rank):
            raise ValueError(f"{where}.lora_B has shape {tuple(p.lora_B.shape)}; expected ({out}, {rank}) to "
                             f"match weight (out) and lora_A (r)")
    if p.bias is not None:
        if tuple(p.bias.shape) != (out,) or p.bias.device != x.device:
            raise ValueError(f"{where}.bias must have shape ({out},) on {x.device}, got {tuple(p.bias.shape)} "
                             f"on {p.bias.device}")
    if (dense and p.weight.requires_grad) or (p.bias is not None and p.bias.requires_grad):
        raise ValueError(f"{where}: the base weight and bias must be frozen (requires_grad=False); the fused "
                         f"block computes no gradient for them")
    if not 0.0 <= p.dropout < 1.0:
        raise ValueError(f"{where}.dropout must be in [0, 1), got {p.dropout}")
    if p.dropout_mask is not None:
        if p.dropout == 0.0 or p.lora_A is None:
            raise ValueError(f"{where}: a dropout_mask was given without an adapter with dropout > 0; set "
                             f"dropout to the p the mask was drawn with")
        if p.dropout_mask.dtype != torch.bool or p.dropout_mask.device != x.device:
            raise TypeError(f"{where}.dropout_mask must be a bool tensor on {x.device}, got "
                            f"{p.dropout_mask.dtype} on {p.dropout_mask.device}")
    return out


def draw_mask(where: str, p: LoRAProjection, rows: int, in_features: int, like: torch.Tensor):
    """The (rows, in) bool dropout mask of a projection: the given one, a fresh draw, or None."""
    if p.dropout == 0.0 or p.lora_A is None:
        return None
    if p.dropout_mask is None:
        return torch.empty((rows, in_features), dtype=like.dtype, device=like.device).bernoulli_(
            1.0 - p.dropout).bool()
    if p.dropout_mask.numel() != rows * in_features or p.dropout_mask.shape[-1] != in_features:
        raise ValueError(f"{where}.dropout_mask has shape {tuple(p.dropout_mask.shape)}; expected the shape "
                         f"of its input, {in_features} columns")
    return p.dropout_mask.reshape(rows, in_features)


def dropped(t: torch.Tensor, mask, keep: float) -> torch.Tensor:
    # PEFT's dropout: t * (mask / (1 - p)), the scale rounded to t's dtype first
    return t if mask is None else t * mask.to(t.dtype).div_(keep)


def dense_weight(weight: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense tensor: itself, or dequantised into the device's shared workspace (valid
    until the next NF4 weight is dequantised on this stream: use it at once)."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize(dtype, workspace=True)


def base_linear(x: torch.Tensor, weight, bias) -> torch.Tensor:
    """x W^T + b for (N, in) x; a 4-bit weight with few rows goes through the fused dequantise-GEMV."""
    if isinstance(weight, NF4Weight) and x.shape[0] <= GEMV_ROWS:
        out = weight.gemv(x)
        return out if bias is None else out.add_(bias)
    return F.linear(x, dense_weight(weight, x.dtype), bias)


class Adapters:
    """The per-projection constants of a group, resolved once per forward: masks, keep rates,
    scalings, base weights and biases (frozen: held here, not saved as activations)."""

    def __init__(self, projections, masks):
        self.weights = [p.weight for p in projections]
        self.biases = [p.bias for p in projections]
        self.scalings = [float(p.scaling) for p in projections]
        self.keeps = [1.0 - p.dropout for p in projections]
        self.masks = masks


def group_forward(x, adapters: Adapters, lora):
    """Outputs y_i and LoRA products xa_i (None without adapter) of projections sharing x.
    lora: the (A_i, B_i) pairs, cast to x's dtype."""
    outs, xas = [], []
    for i, (a, b) in enumerate(lora):
        y = base_linear(x, adapters.weights[i], adapters.biases[i])
        xa = None
        if a is not None:
            xa = dropped(x, adapters.masks[i], adapters.keeps[i]) @ a.t()
            y.addmm_(xa, b.t(), alpha=adapters.scalings[i])
        outs.append(y)
        xas.append(xa)
    return outs, xas


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s * (a @ b) in one launch (beta=0: addmm's input is not read, only its 0-d shape broadcast)."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=s)


def group_backward(dys, x, xas, adapters: Adapters, lora, needs, need_x, out=None):
    """(dx, [(dA_i, dB_i)]) of projections sharing x; needs[i] = (need dA_i, need dB_i).
    dA/dB come in the compute dtype (the caller casts them to the adapters' own). out: a buffer
    for dx, which may be x itself (x is read only before dx is written)."""
    grads, dybs = [], []
    for i, (a, b) in enumerate(lora):
        if a is None:
            grads.append((None, None))
            dybs.append(None)
            continue
        dy, s, mask, keep = dys[i], adapters.scalings[i], adapters.masks[i], adapters.keeps[i]
        dyb = dy @ b
        da = _scaled_mm(dyb.t(), dropped(x, mask, keep), s) if needs[i][0] else None
        db = _scaled_mm(dy.t(), xas[i], s) if needs[i][1] else None
        grads.append((da, db))
        dybs.append(dyb)
    dx = None
    if need_x:
        for i, dy in enumerate(dys):
            w = dense_weight(adapters.weights[i], dy.dtype)
            if dx is None:
                dx = torch.mm(dy, w, out=out)
            else:
                dx.addmm_(dy, w)
        for i, dyb in enumerate(dybs):
            if dyb is None:
                continue
            s, mask, keep = adapters.scalings[i], adapters.masks[i], adapters.keeps[i]
            if mask is None:
                dx.addmm_(dyb, lora[i][0], alpha=s)
            else:
                dx.add_(dropped(dyb @ lora[i][0], mask, keep), alpha=s)
    return dx, grads


def without_autocast(device_type: str):
    """torch.autocast(device_type, enabled=False) where autocast is on, else nothing: entering and
    leaving an autocast context costs host time at every fused call, and it is mostly off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_off(method):
    """For an autograd Function's forward/backward: the block computes in its inputs' dtype, whatever
    autocast state the caller is in (matmuls inside would otherwise be cast piecemeal)."""
    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if torch.is_tensor(a))
        with without_autocast(device):
            return method(ctx, *args)
    return wrapper


_casts = threading.local()  # .scope: see shared_casts


class CastScope(dict):
    """id(tensor) -> (tensor, its version, its cast), and in `used` the tensors cast_lora asked for
    within the scope (their id -> the tensor), cast here or found."""

    def __init__(self):
        super().__init__()
        self.used = {}


@contextlib.contextmanager
def shared_casts(scope: CastScope):
    """Within the block, cast_lora takes its casts from `scope` (filled by cast_together, or by
    cast_lora itself) while the adapter is unchanged (same tensor, same version). The offloaded
    checkpoint gives each layer one scope for its forward, filled ahead with what the layer's last
    forward used, and another for its recompute and backward, filled with what this forward used:
    a foreach copy each, two launches per layer and step instead of one per adapter tensor and use
    (which the host pays for at small shapes), and no copies held from a layer's forward to its
    backward (84 MB of bf16 copies for Llama-3.1-8B at r=16 on all seven projections, on top of the
    peak). Per thread: autograd runs a CUDA backward in its own thread, and a layer's recompute and
    backward enter the scope there."""
    outer = getattr(_casts, "scope", None)
    _casts.scope = scope
    try:
        yield
    finally:
        _casts.scope = outer


def cast_together(tensors, dtype: torch.dtype, device: torch.device) -> CastScope:
    """A shared_casts scope holding the floating tensors on `device` not already in `dtype`, cast in one
    foreach copy into one buffer (freed with the scope). Only plain tensors: a sharded one (FSDP2's
    DTensor, before its module gathers it) is cast on use, one by one."""
    scope = CastScope()
    tensors = [t for t in tensors if type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype != dtype
               and t.is_floating_point() and t.device == device]
    if not tensors:
        return scope
    buffer = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    views = [v.view(t.shape) for v, t in zip(buffer.split([t.numel() for t in tensors]), tensors)]
    with torch.no_grad():
        torch._foreach_copy_(views, tensors)
    scope.update((id(t), (t, t._version, v)) for t, v in zip(tensors, views))
    return scope


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype == dtype:
        return t
    scope = getattr(_casts, "scope", None)
    if scope is None:
        return t.to(dtype)
    scope.used[id(t)] = t
    hit = scope.get(id(t))
    if hit is not None and hit[0] is t and hit[1] == t._version and hit[2].dtype == dtype:
        return hit[2]
    cast = t.to(dtype)
    scope[id(t)] = (t, t._version, cast)
    return cast


def cast_lora(params, dtype):
    """[(A, B)] from the flat (A_0, B_0, A_1, B_1, ...) tuple, in the compute dtype."""
    pairs = []
    for a, b in zip(params[0::2], params[1::2]):
        pairs.append((None, None) if a is None else (_cast(a, dtype), _cast(b, dtype)))
    return pairs


def lora_grads_out(grads, params):
    """The flat (dA_0, dB_0, ...) tuple for autograd, each in its parameter's dtype."""
    flat = []
    for (da, db), a, b in zip(grads, params[0::2], params[1::2]):
        flat += [None if da is None else da.to(a.dtype), None if db is None else db.to(b.dtype)]
    return tuple(flat)


def lora_params(projections):
    flat = []
    for p in projections:
        flat += [p.lora_A, p.lora_B]
    return flat
