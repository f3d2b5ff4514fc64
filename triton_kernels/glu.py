"""Gated-MLP activations (SwiGLU, GeGLU) forward and backward.

Forward, elementwise over gate g and up u (computed in fp32, one rounding to the output dtype):
    y = act(g) * u
Backward, recomputing act from g (nothing but g and u is saved):
    dg = dy * u * act'(g),   du = dy * act(g)
The activations (ACTIVATION constexpr, named as in fusetune.reference.glu.ACTIVATIONS) and their
derivatives, with s = sigmoid:
    silu:      act = g * s(g)
               act' = s(g) * (1 + g * (1 - s(g)))
    gelu_tanh: with c = sqrt(2/pi), k = 0.044715, v = c * (g + k g^3), p = s(2v),
               0.5 * (1 + tanh(v)) = p, so act = g * p, and 1 - tanh(v)^2 = 4 p (1 - p):
               act' = p + 2 g p (1 - p) * c * (1 + 3 k g^2)
    gelu_erf:  act = 0.5 g (1 + erf(g / sqrt 2))
               act' = 0.5 (1 + erf(g / sqrt 2)) + g * exp(-g^2 / 2) / sqrt(2 pi)
tl.math.erf is a core Triton op (math::ErfOp, libdevice erff on NVIDIA, numpy in the
interpreter), so no erf approximation is needed.

Tensors are 2-D (rows, cols) with unit column stride and a row stride each, so the two halves of
a fused gate_up projection (row stride 2 * cols) are read in place. Contiguous inputs are passed
as one row of numel elements. Each program handles a BLOCK_R x BLOCK_C tile.
"""
import torch
import triton
import triton.language as tl

from .utils import interpreting, next_power_of_2

_TILE = 4096  # elements per program, at 8 warps: 16 per thread; ~97% of copy bandwidth on H100


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in fp32; the forward drops the unused derivative at compile time."""
    if ACTIVATION == "silu":
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == "gelu_tanh":
        c: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        k: tl.constexpr = 0.044715
        g2 = g * g
        p = tl.sigmoid(2.0 * c * g * (1.0 + k * g2))
        return g * p, p + 2.0 * g * p * (1.0 - p) * c * (1.0 + 3.0 * k * g2)
    elif ACTIVATION == "gelu_erf":
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
    else:
        tl.static_assert(False, "unknown GLU activation (see fusetune.reference.glu.ACTIVATIONS)")


@triton.jit
def _tile_offsets(row0, col0, row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Element offsets of the (BLOCK_R, BLOCK_C) tile at (row0, col0) of a tensor with row_stride."""
    # int64: row * row_stride and the flattened column index can pass 2^31
    rows = tl.arange(0, BLOCK_R).to(tl.int64) * row_stride
    return row0 * row_stride + col0 + rows[:, None] + tl.arange(0, BLOCK_C)[None, :]


@triton.jit
def _tile_mask(row0, col0, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """True where the tile at (row0, col0) lies inside (n_rows, n_cols)."""
    rows_ok = tl.arange(0, BLOCK_R) < n_rows - row0
    cols_ok = tl.arange(0, BLOCK_C) < n_cols - col0
    return rows_ok[:, None] & cols_ok[None, :]


@triton.jit
def _glu_fwd_kernel(G, U, Y, g_row_stride, u_row_stride, y_row_stride, n_rows, n_cols,
                    col_blocks, ACTIVATION: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """y = act(g) * u on one tile, in fp32, one rounding to Y's dtype. Gradient: _glu_bwd_kernel."""
    pid = tl.program_id(0)
    row0 = (pid // col_blocks).to(tl.int64) * BLOCK_R
    col0 = (pid % col_blocks).to(tl.int64) * BLOCK_C
    mask = _tile_mask(row0, col0, n_rows, n_cols, BLOCK_R, BLOCK_C)
    g = tl.load(G + _tile_offsets(row0, col0, g_row_stride, BLOCK_R, BLOCK_C), mask=mask,
                other=0.0).to(tl.float32)
    u = tl.load(U + _tile_offsets(row0, col0, u_row_stride, BLOCK_R, BLOCK_C), mask=mask,
                other=0.0).to(tl.float32)
    act, _ = _activation(g, ACTIVATION)
    tl.store(Y + _tile_offsets(row0, col0, y_row_stride, BLOCK_R, BLOCK_C),
             (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, dy_row_stride, g_row_stride, u_row_stride, dg_row_stride,
                    du_row_stride, n_rows, n_cols, col_blocks, ACTIVATION: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dg = dy * u * act'(g), du = dy * act(g) on one tile (act recomputed from g; act' per
    activation in the module docstring). DG, DU may alias G, U: each element is read first."""
    pid = tl.program_id(0)
    row0 = (pid // col_blocks).to(tl.int64) * BLOCK_R
    col0 = (pid % col_blocks).to(tl.int64) * BLOCK_C
    mask = _tile_mask(row0, col0, n_rows, n_cols, BLOCK_R, BLOCK_C)
    dy = tl.load(DY + _tile_offsets(row0, col0, dy_row_stride, BLOCK_R, BLOCK_C), mask=mask,
                 other=0.0).to(tl.float32)
    g = tl.load(G + _tile_offsets(row0, col0, g_row_stride, BLOCK_R, BLOCK_C), mask=mask,
                other=0.0).to(tl.float32)
    u = tl.load(U + _tile_offsets(row0, col0, u_row_stride, BLOCK_R, BLOCK_C), mask=mask,
                other=0.0).to(tl.float32)
    act, dact = _activation(g, ACTIVATION)
    tl.store(DG + _tile_offsets(row0, col0, dg_row_stride, BLOCK_R, BLOCK_C),
             (dy * u * dact).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + _tile_offsets(row0, col0, du_row_stride, BLOCK_R, BLOCK_C),
             (dy * act).to(DU.dtype.element_ty), mask=mask)


def _layout(*tensors: torch.Tensor):
    """(n_rows, n_cols, row strides): one row of numel when every tensor is contiguous."""
    rows, cols = tensors[0].shape
    if all(t.is_contiguous() for t in tensors):
        return 1, rows * cols, [rows * cols] * len(tensors)
    return rows, cols, [t.stride(0) for t in tensors]


def _launch(kernel, tensors, activation: str):
    n_rows, n_cols, strides = _layout(*tensors)
    if n_rows * n_cols == 0:
        return
    # 2-D tiles of 1024 columns: the common intermediate sizes (8192, 11008, 14336) waste little.
    # plain int math: triton.cdiv is a constexpr function, slow to call from Python
    block_c = min(_TILE if n_rows == 1 else 1024, next_power_of_2(n_cols))
    block_r = min(_TILE // block_c, next_power_of_2(n_rows))
    col_blocks = -(-n_cols // block_c)
    grid = (-(-n_rows // block_r) * col_blocks,)
    kernel[grid](*tensors, *strides, n_rows, n_cols, col_blocks, ACTIVATION=activation,
                 BLOCK_R=block_r, BLOCK_C=block_c, num_warps=1 if interpreting() else 8)


def glu_fwd(gate2d: torch.Tensor, up2d: torch.Tensor, activation: str) -> torch.Tensor:
    """gate2d, up2d (rows, n), unit column stride, any row stride -> act(gate) * up, contiguous."""
    y = torch.empty(gate2d.shape, dtype=gate2d.dtype, device=gate2d.device)
    _launch(_glu_fwd_kernel, (gate2d, up2d, y), activation)
    return y


def glu_bwd(dy2d: torch.Tensor, gate2d: torch.Tensor, up2d: torch.Tensor, activation: str,
            out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """-> (dgate, dup), contiguous (rows, n) in gate's and up's dtype; or written into `out`, which
    may be (gate2d, up2d) themselves: each element is read before its own gradient is stored."""
    if out is None:
        out = (torch.empty(gate2d.shape, dtype=gate2d.dtype, device=gate2d.device),
               torch.empty(up2d.shape, dtype=up2d.dtype, device=up2d.device))
    _launch(_glu_bwd_kernel, (dy2d, gate2d, up2d, *out), activation)
    return out
