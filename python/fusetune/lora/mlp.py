"""Fused LoRA MLP block: down(act(gate(x)) * up(x)) with a LoRA adapter on each projection.

The projections follow fusetune.lora.projection (PEFT semantics, formulas there). The block,
over N rows:
    g = gate(x),  u = up(x),  h = act(g) * u,  y = down(h)
or, for a fused gate_up projection (Phi-3), [g | u] = gate_up(x). Saved: x, g, u, the (N, r)
products drop(x) A^T of every projection and the dropout masks; h is recomputed in backward from
g and u. The GLU gradient (dg, du) is written over the saved g and u, and the down input gradient
over the recomputed h, so the backward needs no (N, intermediate) buffer beyond those (dropout
on the down projection adds one). Because of that, the graph cannot be run backward twice.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fusetune.lora.projection import (Adapters, LoRAProjection, autocast_off, cast_lora, check_projection,
                                      draw_mask, group_backward, group_forward, lora_grads_out, lora_params)
from fusetune.lora.saved import load, save
from fusetune.ops.glu import backend_for, check_activation, glu_backward, glu_forward


def _split(outs, inter):
    """(g, u) from the upper projections' outputs: [g, u], or the halves of one [g | u]."""
    return (outs[0], outs[1]) if len(outs) == 2 else (outs[0][:, :inter], outs[0][:, inter:])


class _Saved(NamedTuple):
    """What LoRAMLPFunction keeps for backward; the upper lists have one entry per upper projection
    (gate and up, or gate_up)."""
    x: torch.Tensor  # (N, hidden)
    upper_outs: list  # [g, u] or [g | u]; the backward writes (dg, du) over them
    upper_xas: list  # drop(x) A^T (N, r); None without adapter
    down_xas: list  # [drop(h) A^T (N, r) of down, or None]
    upper_params: list  # lora_A, lora_B of every upper projection, flat as the Function's inputs
    down_params: list  # lora_A, lora_B of down
    upper_masks: list  # dropout masks (N, hidden); None without dropout
    down_masks: list  # [dropout mask (N, intermediate) or None]


class LoRAMLPFunction(torch.autograd.Function):
    """Inputs: activation, the GLU's backend, the Adapters of the upper projections (gate and up, or
    gate_up) and of down, x (N, hidden), then (lora_A, lora_B) of every upper projection and of
    down. Gradients: x, every lora_A and lora_B."""

    @staticmethod
    @autocast_off
    def forward(ctx, activation, backend, upper, down, x, *params):
        up_params, down_params = params[:-2], params[-2:]
        upper_outs, upper_xas = group_forward(x, upper, cast_lora(up_params, x.dtype))
        inter = down.weights[0].shape[1]
        g, u = _split(upper_outs, inter)
        h = glu_forward(g, u, activation, backend)
        (y,), down_xas = group_forward(h, down, cast_lora(down_params, x.dtype))
        save(ctx, _Saved(x, upper_outs, upper_xas, down_xas, up_params, down_params, upper.masks, down.masks))
        upper.masks = down.masks = None
        ctx.activation, ctx.backend, ctx.upper, ctx.down = activation, backend, upper, down
        ctx.consumed = False
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, dy):
        if ctx.consumed:
            raise RuntimeError("lora_mlp: backward through this block ran twice; its gradients are "
                               "written over the saved activations (retain_graph=True is unsupported)")
        ctx.consumed = True
        upper, down, saved = ctx.upper, ctx.down, load(ctx)
        upper.masks, down.masks = saved.upper_masks, saved.down_masks
        x = saved.x
        need = ctx.needs_input_grad
        lora_needs = list(zip(need[5::2], need[6::2]))  # (dA_i, dB_i) per projection, down last
        up_needs, down_needs = lora_needs[:-1], lora_needs[-1:]
        inter = down.weights[0].shape[1]
        g, u = _split(saved.upper_outs, inter)

        h = glu_forward(g, u, ctx.activation, ctx.backend)
        # the down input gradient goes into h, which the LoRA gradients read first
        dh, (down_grads,) = group_backward([dy.contiguous()], h, saved.down_xas, down,
                                           cast_lora(saved.down_params, x.dtype), down_needs, True, out=h)
        glu_backward(dh, g, u, ctx.activation, ctx.backend, out=(g, u))  # in place
        del h, dh
        dx, up_grads = group_backward(saved.upper_outs, x, saved.upper_xas, upper,
                                      cast_lora(saved.upper_params, x.dtype), up_needs, need[4])
        return (None, None, None, None, dx, *lora_grads_out(up_grads, saved.upper_params),
                *lora_grads_out([down_grads], saved.down_params))


def lora_mlp(x: torch.Tensor, gate: LoRAProjection | None, up: LoRAProjection | None, down: LoRAProjection,
             activation: str = "silu", gate_up: LoRAProjection | None = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)), every projection with its LoRA adapter, as PEFT computes it.

    x: (..., hidden) in the base weights' dtype (weights dense or NF4Weight). gate_up: instead of
    gate and up (pass None for those), one projection whose output is [gate | up] (Phi-3).
    activation: "silu" (SwiGLU: Llama, Mistral, Qwen, Phi-3), "gelu_tanh" or "gelu_erf" (GeGLU:
    Gemma). A projection may have no adapter. Differentiable in x and in every lora_A / lora_B;
    the base weights and biases must be frozen. The GLU between the projections runs on the
    backend resolved for "swiglu" / "geglu"; the matmuls are torch's. Dropout (per projection,
    p < 1) is active whenever p > 0: pass p = 0 in eval mode.
    """
    check_activation("lora_mlp", activation)
    if not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"lora_mlp: x must be a floating tensor (..., hidden), got {x.dtype} with shape "
                        f"{tuple(x.shape)}")
    if (gate_up is None) == (gate is None or up is None) or (gate_up is not None and (gate or up)):
        raise ValueError("lora_mlp: give gate and up, or gate_up alone")
    hidden = x.shape[-1]
    if gate_up is not None:
        names, upper = ("gate_up",), (gate_up,)
        out2 = check_projection("lora_mlp: gate_up", gate_up, x, hidden)
        if out2 % 2:
            raise ValueError(f"lora_mlp: gate_up has {out2} outputs; expected an even number ([gate | up])")
        inter = out2 // 2
    else:
        names, upper = ("gate", "up"), (gate, up)
        inter = check_projection("lora_mlp: gate", gate, x, hidden)
        if check_projection("lora_mlp: up", up, x, hidden) != inter:
            raise ValueError(f"lora_mlp: up.weight {tuple(up.weight.shape)} and gate.weight "
                             f"{tuple(gate.weight.shape)} must have the same shape")
    out = check_projection("lora_mlp: down", down, x, inter)
    x2d = x.reshape(-1, hidden).contiguous()
    rows = x2d.shape[0]
    upper_masks = [draw_mask(f"lora_mlp: {name}", p, rows, hidden, x2d) for name, p in zip(names, upper)]
    down_masks = [draw_mask("lora_mlp: down", down, rows, inter, x2d)]
    y = LoRAMLPFunction.apply(activation, backend_for(activation, x2d), Adapters(upper, upper_masks),
                              Adapters((down,), down_masks), x2d, *lora_params(upper), *lora_params((down,)))
    return y.view(*x.shape[:-1], out)
