"""Fused LoRA MLP block: down(act(gate(x)) * up(x)) with a LoRA adapter on each projection.

Each projection (PEFT semantics, `lora_B(lora_A(dropout(x))) * scaling` added to the base layer):
    proj(x) = x W^T + b + s * (drop(x) A^T) B^T,   drop(x) = x * mask / (1 - p)
with W (out, in) and b frozen, A (r, in), B (out, r) trainable, s the scaling (alpha / r, or
alpha / sqrt(r) for rsLoRA). The block, over N rows:
    g = gate(x),  u = up(x),  h = act(g) * u,  y = down(h)
Saved: x, g, u, the (N, r) products xa = drop(x) A^T of every projection and the dropout masks;
h is recomputed in backward from g and u. Backward of one projection, dY its output gradient,
with every LoRA product bracketed so that only (N, r) intermediates appear:
    dB = s * dY^T (drop(X) A^T)                 (out, r)
    dA = s * (dY B)^T drop(X)                   (r, in)
    dX = dY W + s * drop^T((dY B) A)            drop^T multiplies by the same mask / (1 - p)
The GLU gradient (dg, du) is written over the saved g and u, and the down input gradient over
the recomputed h, so the backward needs no (N, intermediate) buffer beyond those (dropout on the
down projection adds one). Because of that, the graph cannot be run backward twice.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fusetune.backend import resolve
from fusetune.ops.glu import CUDA_OPS
from fusetune.reference import glu as reference

ACTIVATIONS = {"silu": "swiglu", "gelu_tanh": "geglu", "gelu_erf": "geglu"}  # -> backend op name


@dataclasses.dataclass
class LoRAProjection:
    """One projection with its adapter. weight (out, in) and bias (out,) are frozen; lora_A (r, in)
    and lora_B (out, r) are trained; scaling is PEFT's `scaling[adapter]`. dropout is PEFT's
    lora_dropout p; dropout_mask (bool, the shape of this projection's input) fixes the kept
    elements; None with dropout > 0 draws a fresh Bernoulli(1 - p) mask each forward from torch's
    default generator (so checkpoint's RNG replay redraws the same one); it is the same
    distribution as nn.Dropout's, not the same bits for a given seed."""
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float = 1.0
    bias: torch.Tensor | None = None
    dropout: float = 0.0
    dropout_mask: torch.Tensor | None = None


def _check_projection(name: str, p: LoRAProjection, x: torch.Tensor, in_features: int):
    where = f"lora_mlp: {name}"
    tensors = {"weight": p.weight, "lora_A": p.lora_A, "lora_B": p.lora_B, "bias": p.bias}
    for key, t in tensors.items():
        if t is None:
            if key != "bias":
                raise ValueError(f"{where}.{key} is None; every projection needs a LoRA adapter")
            continue
        if t.device != x.device:
            raise ValueError(f"{where}.{key} is on {t.device} but x on {x.device}; move them to one "
                             f"device")
        if t.dtype != x.dtype:
            raise TypeError(f"{where}.{key} is {t.dtype} but x is {x.dtype}; cast the adapter and "
                            f"the input to one dtype")
    if p.weight.dim() != 2 or p.weight.shape[1] != in_features:
        raise ValueError(f"{where}.weight has shape {tuple(p.weight.shape)}; expected (out, "
                         f"{in_features})")
    out = p.weight.shape[0]
    if p.lora_A.dim() != 2 or p.lora_A.shape[1] != in_features:
        raise ValueError(f"{where}.lora_A has shape {tuple(p.lora_A.shape)}; expected (r, "
                         f"{in_features})")
    rank = p.lora_A.shape[0]
    if tuple(p.lora_B.shape) != (out, rank):
        raise ValueError(f"{where}.lora_B has shape {tuple(p.lora_B.shape)}; expected ({out}, {rank})"
                         f" to match weight (out) and lora_A (r)")
    if p.bias is not None and tuple(p.bias.shape) != (out,):
        raise ValueError(f"{where}.bias has shape {tuple(p.bias.shape)}; expected ({out},)")
    if p.weight.requires_grad or (p.bias is not None and p.bias.requires_grad):
        raise ValueError(f"{where}: the base weight and bias must be frozen (requires_grad=False); "
                         f"the fused block computes no gradient for them")
    if not 0.0 <= p.dropout < 1.0:
        raise ValueError(f"{where}.dropout must be in [0, 1), got {p.dropout}")
    if p.dropout_mask is not None:
        if p.dropout == 0.0:
            raise ValueError(f"{where}: a dropout_mask was given with dropout=0; set dropout to the p "
                             f"the mask was drawn with")
        if p.dropout_mask.dtype != torch.bool or p.dropout_mask.device != x.device:
            raise TypeError(f"{where}.dropout_mask must be a bool tensor on {x.device}, got "
                            f"{p.dropout_mask.dtype} on {p.dropout_mask.device}")
    return out


def _mask_rows(name, p: LoRAProjection, shape, like: torch.Tensor):
    """The (rows, in) bool mask of a projection: the given one, a fresh draw, or None."""
    if p.dropout == 0.0:
        return None
    if p.dropout_mask is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p.dropout).bool()
    if p.dropout_mask.numel() != shape[0] * shape[1] or p.dropout_mask.shape[-1] != shape[1]:
        raise ValueError(f"lora_mlp: {name}.dropout_mask has shape {tuple(p.dropout_mask.shape)}; "
                         f"expected the shape of the {name} input, {shape[1]} columns")
    return p.dropout_mask.reshape(shape)


def _dropped(t: torch.Tensor, mask, keep: float) -> torch.Tensor:
    # PEFT's dropout: t * (mask / (1 - p)), the scale rounded to t's dtype first
    return t if mask is None else t * mask.to(t.dtype).div_(keep)


def _project(x, w, b, a, bm, mask, s, keep):
    xa = _dropped(x, mask, keep) @ a.t()
    out = F.linear(x, w, b)
    out.addmm_(xa, bm.t(), alpha=s)
    return out, xa


def _glu_forward(g, u, activation, use_triton):
    if use_triton:
        from fusetune.triton_kernels.glu import glu_fwd

        return glu_fwd(g, u, activation)
    if activation == "silu":
        return reference.swiglu(g, u)
    return reference.geglu(g, u, "tanh" if activation == "gelu_tanh" else "none")


def _glu_backward_inplace(dh, g, u, activation, use_triton):
    """Writes dg over g and du over u."""
    if use_triton:
        from fusetune.triton_kernels.glu import glu_bwd

        glu_bwd(dh, g, u, activation, out=(g, u))
        return
    with torch.enable_grad():
        g_, u_ = g.detach().requires_grad_(), u.detach().requires_grad_()
        dg, du = torch.autograd.grad(_glu_forward(g_, u_, activation, False), (g_, u_), dh)
    g.copy_(dg)
    u.copy_(du)


def _lora_grads(dy, xa, x, mask, keep, a, bm, s, need_a, need_b):
    """(dA, dB, dY B) of one projection, every product (N, r) first."""
    dyb = dy @ bm
    da = (dyb.t() @ _dropped(x, mask, keep)).mul_(s) if need_a else None
    db = (dy.t() @ xa).mul_(s) if need_b else None
    return da, db, dyb


def _add_lora_input_grad(dx, dyb, a, s, mask, keep):
    if mask is None:
        dx.addmm_(dyb, a, alpha=s)
    else:
        dx.add_(_dropped(dyb @ a, mask, keep), alpha=s)


class LoRAMLPFunction(torch.autograd.Function):
    """The block over (N, hidden) rows; see the module docstring for what is saved and computed.

    Inputs after the four constants: x, then (weight, bias, lora_A, lora_B, mask) for gate, up
    and down; bias and mask may be None. Gradients: x, every lora_A and lora_B.
    """

    @staticmethod
    def forward(ctx, activation, use_triton, scalings, keeps, x, *params):
        (wg, bg, ag, bmg, mg), (wu, bu, au, bmu, mu), (wd, bd, ad, bmd, md) = (
            params[0:5], params[5:10], params[10:15])
        sg, su, sd = scalings
        kg, ku, kd = keeps
        g, xag = _project(x, wg, bg, ag, bmg, mg, sg, kg)
        u, xau = _project(x, wu, bu, au, bmu, mu, su, ku)
        h = _glu_forward(g, u, activation, use_triton)
        y, had = _project(h, wd, bd, ad, bmd, md, sd, kd)
        ctx.save_for_backward(x, g, u, xag, xau, had, wg, ag, bmg, mg, wu, au, bmu, mu, wd, ad, bmd, md)
        ctx.activation, ctx.use_triton, ctx.scalings, ctx.keeps = activation, use_triton, scalings, keeps
        ctx.consumed = False
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.consumed:
            raise RuntimeError("lora_mlp: backward through this block ran twice; its gradients are "
                               "written over the saved activations (retain_graph=True is unsupported)")
        ctx.consumed = True
        x, g, u, xag, xau, had, wg, ag, bmg, mg, wu, au, bmu, mu, wd, ad, bmd, md = ctx.saved_tensors
        sg, su, sd = ctx.scalings
        kg, ku, kd = ctx.keeps
        need = ctx.needs_input_grad[4:]
        need_x = need[0]
        (need_ag, need_bg), (need_au, need_bu), (need_ad, need_bd) = need[3:5], need[8:10], need[13:15]
        dy = dy.contiguous()

        h = _glu_forward(g, u, ctx.activation, ctx.use_triton)
        dad, dbd, dyb = _lora_grads(dy, had, h, md, kd, ad, bmd, sd, need_ad, need_bd)
        dh = torch.mm(dy, wd, out=h)  # h is no longer needed
        _add_lora_input_grad(dh, dyb, ad, sd, md, kd)
        _glu_backward_inplace(dh, g, u, ctx.activation, ctx.use_triton)
        dg, du = g, u
        del h, dh

        dag, dbg, dgb = _lora_grads(dg, xag, x, mg, kg, ag, bmg, sg, need_ag, need_bg)
        dau, dbu, dub = _lora_grads(du, xau, x, mu, ku, au, bmu, su, need_au, need_bu)
        dx = None
        if need_x:
            dx = dg @ wg
            dx.addmm_(du, wu)
            _add_lora_input_grad(dx, dgb, ag, sg, mg, kg)
            _add_lora_input_grad(dx, dub, au, su, mu, ku)
        return (None, None, None, None, dx,
                None, None, dag, dbg, None,
                None, None, dau, dbu, None,
                None, None, dad, dbd, None)


def lora_mlp(x: torch.Tensor, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection,
             activation: str = "silu") -> torch.Tensor:
    """down(act(gate(x)) * up(x)), every projection with its LoRA adapter, as PEFT computes it.

    x: (..., hidden), same dtype and device as every weight. activation: "silu" (SwiGLU: Llama,
    Mistral, Qwen, Phi-3), "gelu_tanh" or "gelu_erf" (GeGLU: Gemma). Differentiable in x and in
    every lora_A / lora_B; the base weights and biases must be frozen. The GLU between the
    projections runs on the backend resolved for "swiglu" / "geglu"; the matmuls are torch's.
    Dropout (per projection, p < 1) is active whenever p > 0: pass p = 0 in eval mode.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{activation!r}")
    if not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"lora_mlp: x must be a floating tensor (..., hidden), got {x.dtype} with "
                        f"shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    inter = _check_projection("gate", gate, x, hidden)
    if _check_projection("up", up, x, hidden) != inter:
        raise ValueError(f"lora_mlp: up.weight {tuple(up.weight.shape)} and gate.weight "
                         f"{tuple(gate.weight.shape)} must have the same shape")
    out = _check_projection("down", down, x, inter)
    x2d = x.reshape(-1, hidden).contiguous()
    rows = x2d.shape[0]
    masks = (_mask_rows("gate", gate, (rows, hidden), x2d), _mask_rows("up", up, (rows, hidden), x2d),
             _mask_rows("down", down, (rows, inter), x2d))
    use_triton = resolve(ACTIVATIONS[activation], x.device, CUDA_OPS) == "triton"
    projections = (gate, up, down)
    params = []
    for p, mask in zip(projections, masks):
        params += [p.weight, p.bias, p.lora_A, p.lora_B, mask]
    y = LoRAMLPFunction.apply(activation, use_triton, tuple(float(p.scaling) for p in projections),
                              tuple(1.0 - p.dropout for p in projections), x2d, *params)
    return y.view(*x.shape[:-1], out)
