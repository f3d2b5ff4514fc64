"""NF4 quantiser, state and dequantisation, byte-compatible with bitsandbytes (>= 0.50, CPU path).

quantize_nf4 writes what bitsandbytes.functional.quantize_4bit(w, quant_type="nf4",
compress_statistics=double_quant) writes on CPU: codes by nearest NF4 value (midpoint ties go
down), absmax per block, and for double quantisation offset = mean(absmax) with absmax - offset
quantised in blocks of 256 to the signed 8-bit dynamic map. State dicts use bitsandbytes' keys
(absmax, quant_map, nested_absmax, nested_quant_map, quant_state.bitsandbytes__nf4, the last a
uint8 tensor holding JSON), so checkpoints load either way; nothing is pickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from fusetune.ops import nf4_dequant, nf4_gemv
from fusetune.reference import nf4 as _ref

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_STATE_KEY = "quant_state.bitsandbytes__nf4"


@dataclass
class NF4State:
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor            # fp32 per block, or uint8 codes when nested
    code: torch.Tensor              # the 16 NF4 values (fp32)
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None  # 0-dim fp32
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def op_args(self) -> dict:
        """The weight's description as keyword arguments of fusetune.ops.nf4_dequant / nf4_gemv."""
        return {"absmax": self.absmax, "blocksize": self.blocksize, "shape": self.shape, "code": self.code,
                "nested_absmax": self.nested_absmax, "nested_code": self.nested_code, "offset": self.offset,
                "nested_blocksize": self.nested_blocksize}

    @classmethod
    def from_bitsandbytes(cls, quant_state) -> "NF4State":
        """The same state, read from a bitsandbytes QuantState (no copies)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"quant_type {quant_state.quant_type!r} is not supported; only nf4")
        state = cls(quant_state.shape, quant_state.dtype, quant_state.blocksize, quant_state.absmax,
                    quant_state.code)
        if quant_state.nested:
            nested = quant_state.state2
            state.nested_absmax, state.nested_code = nested.absmax, nested.code
            state.offset, state.nested_blocksize = quant_state.offset, nested.blocksize
        return state


@dataclass
class NF4Weight:
    """A frozen 4-bit weight of shape state.shape: packed NF4 bytes and their state.
    dequantize() gives the dense weight; with workspace=True it lands in a buffer reused by every
    NF4 weight on this device and stream, valid until the next such call (for an immediate matmul):
    the same tensor comes back for every weight of that shape, to be read, never changed in place."""
    packed: torch.Tensor
    state: NF4State

    @property
    def shape(self) -> torch.Size:
        return self.state.shape

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, dtype: torch.dtype | None = None, workspace: bool = False) -> torch.Tensor:
        dtype = dtype or self.state.dtype
        out = _workspace(self.packed.device, dtype, self.state.shape) if workspace else None
        return dequantize_nf4(self.packed, self.state, dtype, out=out)

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ W^T for a few rows M (<= 16 on the Triton backend), the dense W never written."""
        return nf4_gemv(x, self.packed, **self.state.op_args())


_WORKSPACES: dict[tuple, tuple[torch.Tensor, dict]] = {}  # key -> (buffer, its views by shape)


def _workspace(device: torch.device, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """A view of shape `shape` into the dequantisation buffer of (device, current stream, dtype),
    grown to the largest weight seen. Work queued on one stream runs in order, so a weight
    dequantised here is consumed by its matmul before the next dequantisation overwrites it.
    The views are kept per shape: a model has a handful, and each call is one less pair of
    slice-and-view ops on the host (hundreds per QLoRA step)."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream, dtype)
    buffer, views = _WORKSPACES.get(key, (None, None))
    view = views.get(shape) if views is not None else None
    if view is not None:
        return view
    numel = shape.numel()
    if buffer is None or buffer.numel() < numel:
        _WORKSPACES.pop(key, None)
        buffer = views = None  # the old buffer and its views go before the new one is allocated
        with torch.inference_mode(False):  # a buffer first made under inference_mode would refuse training
            buffer, views = torch.empty(numel, dtype=dtype, device=device), {}
        _WORKSPACES[key] = buffer, views
    view = views[shape] = buffer[:numel].view(shape)
    return view


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): for exponent i in
    0..6, the midpoints of 2^i + 1 points evenly spaced over [0.1, 1], scaled by 10^(i - 6), both
    signs; plus 0 and 1; sorted."""
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0  # scaled in fp32, as bitsandbytes does
        data += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()
    return torch.tensor(sorted(data + [0.0, 1.0]), dtype=torch.float32)


def _block_scales(x: torch.Tensor, blocksize: int):
    """bitsandbytes' block normalisation: full blocks multiply by 1/absmax, the short last block
    divides; absmax of a zero block is 0 (1e-38 in a short last block)."""
    n = x.numel()
    full = n - n % blocksize
    absmax = x[:full].view(-1, blocksize).abs().amax(1)
    scaled = (x[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if n % blocksize:
        rest = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, rest[None]])
        scaled = torch.cat([scaled, x[full:] / rest])
    return scaled.clamp(-1, 1), absmax


def _quantize_absmax(absmax: torch.Tensor):
    """absmax - mean(absmax) -> uint8 codes into the dynamic map, as bitsandbytes' CPU library
    does: each value times 1/absmax of its block of 256 (a product, not a quotient: the two differ
    by an ulp that moves a code about once per million values) lies in [-1, 1] and picks one of
    65536 evenly spaced buckets, trunc((v+1)/2*65535+0.5), whose centre is rounded to the nearest
    code (ties to the lower one)."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    pad = -n % NESTED_BLOCKSIZE
    blocks = torch.nn.functional.pad(centred, (0, pad)).view(-1, NESTED_BLOCKSIZE)
    nested_absmax = blocks.abs().amax(1)
    normed = (blocks * (1.0 / nested_absmax[:, None])).reshape(-1)[:n].clamp(-1, 1)
    bucket = (((normed + 1) * 0.5) * 65535 + 0.5).to(torch.int64)
    code = _dynamic_map().to(absmax.device)
    centre = bucket.double() / 65535 * 2 - 1
    bounds = (code.double()[:-1] + code.double()[1:]) / 2
    q = torch.bucketize(centre, bounds).to(torch.uint8)
    return q, nested_absmax, code, offset


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """weight (fp32/bf16/fp16, any shape) -> (packed uint8 of shape (ceil(n/2), 1), NF4State)."""
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_nf4 takes fp32/bf16/fp16 weights, got {weight.dtype}: cast first")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one bitsandbytes reads; use one of {BLOCKSIZES}")
    x = weight.detach().reshape(-1).float()
    scaled, absmax = _block_scales(x, blocksize)
    code = _ref.nf4_code(x.device)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    state = NF4State(weight.shape, weight.dtype, blocksize, absmax, code)
    if double_quant:
        state.absmax, state.nested_absmax, state.nested_code, state.offset = _quantize_absmax(absmax)
    return packed, state


def dequantize_nf4(packed: torch.Tensor, state: NF4State, out_dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """packed NF4 data -> tensor of state.shape in out_dtype (default state.dtype), written into
    `out` (contiguous, of that shape and dtype) when given."""
    return nf4_dequant(packed, dtype=out_dtype or state.dtype, out=out, **state.op_args())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_to_dict(state: NF4State) -> dict[str, torch.Tensor]:
    """bitsandbytes' QuantState.as_dict(packed=True) layout (prefix the keys with "<param>.")."""
    meta = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": _dtype_name(state.dtype),
            "shape": list(state.shape)}
    out = {"absmax": state.absmax, "quant_map": state.code}
    if state.nested:
        meta.update({"nested_blocksize": state.nested_blocksize, "nested_dtype": "float32",
                     "nested_offset": float(state.offset)})
        out.update({"nested_absmax": state.nested_absmax, "nested_quant_map": state.nested_code.clone()})
    out[_STATE_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def state_from_dict(tensors: dict[str, torch.Tensor], device=None) -> NF4State:
    """Inverse of state_to_dict; keys may carry a "<param>." prefix."""
    plain = {k.split(".")[-1] if "quant_state" not in k else _STATE_KEY: v for k, v in tensors.items()}
    if _STATE_KEY not in plain:
        raise ValueError(f"no {_STATE_KEY} entry: not an NF4 state saved by bitsandbytes or fusetune "
                         f"(found {sorted(tensors)})")
    meta = json.loads(bytes(plain[_STATE_KEY].cpu().tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"quant_type {meta.get('quant_type')!r} is not supported; only nf4")
    state = NF4State(torch.Size(meta["shape"]), getattr(torch, meta["dtype"]), meta["blocksize"],
                     plain["absmax"].to(device), plain["quant_map"].to(device))
    if "nested_absmax" in plain:
        state.nested_absmax = plain["nested_absmax"].to(device)
        state.nested_code = plain["nested_quant_map"].to(device)
        state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device)
        state.nested_blocksize = meta["nested_blocksize"]
    return state
