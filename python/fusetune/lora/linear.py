"""Fused LoRA linear group: projections that share one input (q, k, v; Phi-3's qkv_proj; o_proj
alone), each `x W^T + b + s * (drop(x) A^T) B^T` (see fusetune.lora.projection for the formulas).

Saved for backward: the input once, the (N, r) products drop(x) A^T and the dropout masks; PEFT
saves the input once per adapter (and the dropped input per adapter when dropout is on). A 4-bit
(NF4) base weight is dequantised into a shared per-device buffer for each matmul that needs it
(forward, and the input gradient in backward), or, for at most 16 rows, multiplied by the fused
dequantise-GEMV kernel without ever being written out in bf16.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fusetune.lora.projection import (Adapters, LoRAProjection, autocast_off, cast_lora, check_projection,
                                      draw_mask, group_backward, group_forward, lora_grads_out, lora_params)
from fusetune.lora.saved import load, save


class _Saved(NamedTuple):
    """What LoRALinearFunction keeps for backward; the lists have one entry per projection."""
    x: torch.Tensor  # (N, in), once for the group
    xas: list  # drop(x) A^T (N, r); None without adapter
    params: list  # lora_A, lora_B of every projection, flat as the Function's inputs
    masks: list  # dropout masks (N, in); None without dropout


class LoRALinearFunction(torch.autograd.Function):
    """Inputs: the Adapters constants, x (N, in), then (lora_A, lora_B) of every projection (None
    for a projection without adapter). Outputs: one (N, out_i) tensor per projection."""

    @staticmethod
    @autocast_off
    def forward(ctx, adapters, x, *params):
        lora = cast_lora(params, x.dtype)
        outs, xas = group_forward(x, adapters, lora)
        save(ctx, _Saved(x, xas, params, adapters.masks))
        adapters.masks = None
        ctx.adapters = adapters
        return tuple(outs)

    @staticmethod
    @autocast_off
    def backward(ctx, *dys):
        adapters, saved = ctx.adapters, load(ctx)
        adapters.masks = saved.masks
        x = saved.x
        dys = [torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device) if dy is None
               else dy.contiguous() for dy, w in zip(dys, adapters.weights)]
        need = ctx.needs_input_grad
        lora_needs = list(zip(need[2::2], need[3::2]))  # (dA_i, dB_i) per projection
        dx, grads = group_backward(dys, x, saved.xas, adapters, cast_lora(saved.params, x.dtype), lora_needs, need[1])
        return (None, dx, *lora_grads_out(grads, saved.params))


def lora_linear(x: torch.Tensor, *projections: LoRAProjection) -> tuple[torch.Tensor, ...]:
    """Every projection of x (..., in) with its LoRA adapter, as PEFT computes it; returns one
    tensor (..., out_i) per projection. Differentiable in x and every lora_A / lora_B; base weights
    (dense in x's dtype, or NF4Weight) and biases must be frozen. Dropout (per projection, p < 1)
    is active whenever p > 0: pass p = 0 in eval mode."""
    if not projections:
        raise ValueError("lora_linear: give at least one projection")
    if not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"lora_linear: x must be a floating tensor (..., in), got {x.dtype} with shape "
                        f"{tuple(x.shape)}")
    hidden = x.shape[-1]
    for i, p in enumerate(projections):
        check_projection(f"lora_linear: projection {i}", p, x, hidden)
    x2d = x.reshape(-1, hidden).contiguous()
    masks = [draw_mask(f"lora_linear: projection {i}", p, x2d.shape[0], hidden, x2d)
             for i, p in enumerate(projections)]
    outs = LoRALinearFunction.apply(Adapters(projections, masks), x2d, *lora_params(projections))
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)
