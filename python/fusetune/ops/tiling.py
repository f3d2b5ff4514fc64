"""Sequence tiling: a position-wise block (the MLP) computed a chunk of tokens at a time, so that
its intermediate activations exist for one chunk at a time instead of the whole sequence.

At long context the MLP's intermediates dominate a layer's memory: Llama-3.1-8B's gate, up and
their product are 3 x 14,336 values per token, 28 GB at 320k tokens in bf16, against 2.6 GB for
the layer's input. Every row of the MLP's output depends on that row of its input only, so the
rows can be split freely:
  - without grad (the forward of a checkpointed layer, inference): a loop over chunks into one
    output tensor;
  - with grad: SequenceTiledFunction keeps only the input; backward recomputes each chunk with
    grad, takes its gradients (the parameters' summed over the chunks) and drops it. The price is
    one more forward of the block per backward.
The chunk comes from free GPU memory (mlp_chunk_rows), and only when the whole block would not
fit comfortably; a fixed chunk can be forced (patch_model(tiled_mlp=N), the CPU tests).
ForwardState, the replay of a forward's RNG and autocast state, is shared with the offloaded
checkpoint (fusetune.training.checkpoint).
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from fusetune.backend import requested_backend, use_backend

_ROW_VALUES = 4  # intermediate-width values per token the block holds at once (gate, up, product, a gradient)
_MIN_ROWS = 1024  # below this a chunk's GEMMs lose efficiency


class ForwardState:
    """The RNG, autocast and backend state a forward ran under, taken when it starts, so that a
    recompute in backward replays it exactly: the same dropout masks, the same casts (autocast as it
    was in the forward, not as it is in backward), the same kernels (a use_backend request is per
    thread, and autograd runs a CUDA backward on a thread of its own), with grad on. The caller's
    RNG state is left as it was."""

    def __init__(self, device: torch.device):
        self.device = device
        self.backend = requested_backend()
        self.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                         for kind in dict.fromkeys((device.type, "cpu"))]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), contextlib.ExitStack() as stack:
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            stack.enter_context(use_backend(self.backend))
            stack.enter_context(torch.enable_grad())
            yield


def mlp_chunk_rows(x: torch.Tensor, intermediate: int) -> int | None:
    """Rows per chunk for a tiled MLP of width `intermediate` on x (..., hidden), or None to run it
    whole: whole when its intermediates take under half of the GPU memory free to this process,
    else chunks whose intermediates take a quarter of it. CPU tensors always run whole."""
    rows = x.shape[:-1].numel()
    per_row = _ROW_VALUES * intermediate * x.element_size()
    if not x.is_cuda or rows * per_row < 1 << 28:
        return None  # small enough not to ask the driver
    return chunk_rows_for(rows, per_row, free_gpu_bytes(x.device))


def chunk_rows_for(rows: int, per_row: int, free: int) -> int | None:
    """None while rows * per_row bytes take at most half of `free`; else the rows (a multiple of 256,
    at least _MIN_ROWS) whose bytes take a quarter of it."""
    if rows * per_row <= free // 2:
        return None
    chunk = max(_MIN_ROWS, free // 4 // per_row // 256 * 256)
    return chunk if chunk < rows else None


def free_gpu_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: the driver's free memory plus what the
    caching allocator holds unused, within a set_per_process_memory_fraction cap."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    cap = int(total * torch.cuda.get_per_process_memory_fraction(device))  # (it caps what the allocator reserves)
    return max(0, min(free, cap - allocated))


def sequence_tiled(function, x: torch.Tensor, chunk_rows: int, params=()) -> torch.Tensor:
    """function(x) for a position-wise `function` (row i of its output depends on row i of its
    input only), computed chunk_rows rows of x (..., hidden) at a time. params: every tensor
    `function` reads that needs a gradient (its trainable parameters); they get it through
    autograd as from an untiled call, once per backward (DDP's and FSDP's hooks count on that).
    Returns (..., out). Dropout inside `function` draws the same masks in the recompute."""
    if chunk_rows < 1:
        raise ValueError(f"sequence_tiled: chunk_rows must be at least 1, got {chunk_rows}")
    rows = x.shape[:-1].numel()
    if rows <= chunk_rows:
        return function(x)
    flat = x.reshape(rows, x.shape[-1])
    params = [p for p in params if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or params):
        out = SequenceTiledFunction.apply(function, chunk_rows, flat, *params)
    else:
        out = _forward_chunks(function, flat, chunk_rows)
    return out.view(*x.shape[:-1], out.shape[-1])


def _forward_chunks(function, flat: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    out = None
    for start in range(0, flat.shape[0], chunk_rows):
        part = function(flat[start:start + chunk_rows])
        if out is None:
            out = part.new_empty(flat.shape[0], part.shape[-1])
        out[start:start + part.shape[0]] = part
        del part
    return out


class SequenceTiledFunction(torch.autograd.Function):
    """forward(ctx, function, chunk_rows, x (rows, hidden), *params) -> function(x), keeping x only.
    Backward recomputes one chunk at a time with grad and takes its gradients (x's rows, and each
    param's share, summed over the chunks): the chunk's intermediates are freed before the next."""

    @staticmethod
    def forward(ctx, function, chunk_rows, x, *params):
        ctx.function, ctx.chunk_rows, ctx.state = function, chunk_rows, ForwardState(x.device)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return _forward_chunks(function, x, chunk_rows)

    @staticmethod
    @once_differentiable  # (a create_graph backward raises rather than silently detaching)
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        dx = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        dparams = [None] * len(params)
        with ctx.state.replay():  # the forward's chunks in its order: the same dropout masks
            for start in range(0, x.shape[0], ctx.chunk_rows):
                stop = start + ctx.chunk_rows
                part = x[start:stop].detach().requires_grad_(dx is not None)
                out = ctx.function(part)
                inputs = ([part] if dx is not None else []) + params
                grads = list(torch.autograd.grad(out, inputs, dy[start:stop], allow_unused=True)) \
                    if out.requires_grad else [None] * len(inputs)
                if dx is not None:
                    g = grads.pop(0)
                    dx[start:stop] = 0 if g is None else g
                for i, g in enumerate(grads):
                    if g is not None:
                        dparams[i] = g if dparams[i] is None else dparams[i].add_(g)
                del out, part, grads
        return None, None, dx, *dparams
