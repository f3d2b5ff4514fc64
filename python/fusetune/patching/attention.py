"""fusetune's attention as a Hugging Face attention implementation ("fusetune").

patch_model registers it with transformers' AttentionInterface (the extension point transformers
offers for custom kernels) together with a mask function (`attention_mask`: transformers' flash-
attention one for training shapes, its SDPA one with a KV cache), and sets it as the patched model's
`config._attn_implementation`. No (tokens x tokens) mask is built for training shapes: each layer
gets the 2-D padding mask (or None) and the position ids, and `attention_forward` routes:

- the flash-attention kernel (fusetune.ops.attention) for packed rows (documents are the runs of
  consecutive position ids, as transformers detects them; transformers 5.25 looks for them only
  without a KV cache, so a packed training forward left at use_cache=True attends across documents
  there and not here), padded rows of 4k tokens or more,
  Gemma-2's logit softcap and sliding windows: the cases torch's fast SDPA backends cannot take
  without a dense mask (shorter padded rows take SDPA with the padding mask, as transformers does);
- torch SDPA with is_causal (its cuDNN / flash backends) for plain causal rows without padding:
  measured faster there (bench/attention.py, H100: cuDNN 434-559 TFLOP/s forward + backward at
  4k-32k against the kernel's 258-330); called through fusetune.ops.sdpa, so that an offloaded
  checkpoint's recompute reuses the forward's output as it does the kernel's;
- with a KV cache (decoding, static or dynamic) transformers' own SDPA mask and SDPA (the plain
  softcap formula where one applies); a dense mask for what the kernel does not do otherwise:
  attention dropout, head dims over 256, tensors it cannot run on.
With `attention="always"` the kernel takes the plain causal rows too.

FusedCausalLM computes the documents once per forward and passes them down as the keyword
`fusetune_documents` (transformers hands unknown keywords through to the attention); a layer called
without it derives them from its position ids.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusetune.backend import resolve
from fusetune.ops.attention import CUDA_OPS, DTYPES, MAX_HEAD_DIM, attention, segments
from fusetune.ops.sdpa import sdpa
from fusetune.patching import context_parallel
from fusetune.reference.attention import allowed

KEY = "fusetune"
# padded rows (no packing, softcap or window) at least this long take the kernel, shorter ones SDPA with
# the padding mask: on the H100 the kernel's forward + backward passes SDPA flash from 4k tokens on, and
# padded 1B micro-batches of 300-1000 tokens trained at half transformers' speed through the kernel
PADDED_KERNEL_FROM = 4096


@dataclass(frozen=True)
class Documents:
    """The packed documents of a batch: segments() of the position-id runs, or None (one per row)."""
    runs: tuple | None


def position_runs(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) ids of the runs of consecutive positions: a new document wherever a position is not
    the previous one plus 1 (transformers' packed-sequence rule). No host sync."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def documents(position_ids: torch.Tensor | None, batch: int) -> Documents:
    """The documents of a forward given these position ids (None: every row one sequence)."""
    if position_ids is None:
        return Documents(None)
    return Documents(segments(position_runs(position_ids.expand(batch, -1))))


def attention_mask(**kwargs):
    """The mask transformers builds for this implementation: for training shapes (as many keys as
    queries) only the 2-D padding mask or None (flash attention's), so no (tokens x tokens) mask is
    made; with a KV cache, static or dynamic, SDPA's own mask (filled slots, offsets, windows)."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    if kwargs["q_length"] != kwargs["kv_length"]:
        return sdpa_mask(**kwargs)
    return flash_attention_mask(**kwargs)


@functools.cache
def register() -> str:
    """Register the implementation with transformers (once per process); returns its key."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(KEY, attention_forward)
    AttentionMaskInterface.register(KEY, attention_mask)
    return KEY


def attention_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """Hugging Face's attention-function contract: query (B, Hq, Sq, D), key/value (B, Hk, Sk, D),
    attention_mask the 2-D padding mask of the keys or None; returns ((B, Sq, Hq, D), None). Under
    context parallelism (patching/context_parallel.py) the tensors hold this process's shard of the
    sequence, and the attention runs over the whole sequence for a share of the heads."""
    group = module.__dict__.get(context_parallel.ATTRIBUTE)
    if group is not None:
        return context_parallel.sharded_attention(group, _attend, module, query, key, value, attention_mask,
                                                  position_ids, **kwargs)
    return _attend(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)


def _attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
            softcap=None, position_ids=None, fusetune_documents=None, **kwargs):
    batch, _, sq, head_dim = query.shape
    sk = key.shape[2]
    window = sliding_window or None
    softcap = softcap or None
    causal = getattr(module, "is_causal", True)
    if attention_mask is not None and attention_mask.dim() == 4:  # a KV cache: transformers' SDPA mask
        return _sdpa(query, key, value, attention_mask, dropout, scaling, softcap), None
    kernel = (sq == sk and not dropout and head_dim <= MAX_HEAD_DIM and query.dtype in DTYPES
              and resolve("attention", query.device, CUDA_OPS) == "triton")
    if not kernel:
        return _dense(query, key, value, attention_mask, dropout, scaling, window, softcap, causal,
                      position_ids if sq == sk else None), None
    if fusetune_documents is None:
        fusetune_documents = documents(position_ids, batch)
    runs = fusetune_documents.runs
    plain = window is None and softcap is None and causal and getattr(module, "_fusetune_attention", True) != "always"
    if plain and runs is None and attention_mask is not None and sq < PADDED_KERNEL_FROM:
        # short padded rows: SDPA with the padding mask, as transformers runs them (measured faster there)
        return _dense(query, key, value, attention_mask, dropout, scaling, window, softcap, causal, None), None
    if attention_mask is not None:
        # padding: a padded key is its own segment (-1); bounds span the row (holes may sit anywhere)
        ids = runs[0] if runs is not None else torch.zeros_like(attention_mask, dtype=torch.int32)
        ids = torch.where(attention_mask.bool(), ids, -1).to(torch.int32)
        runs = (ids, torch.zeros_like(ids), torch.full_like(ids, sq))
    elif plain and runs is None:
        return sdpa(query, key, value, causal=True, scale=scaling).transpose(1, 2), None
    out = attention(query, key, value, causal=causal, scale=scaling, softcap=softcap, window=window, runs=runs)
    if attention_mask is not None:
        # a query with no real key up to it (left padding) gets SDPA's zero output, not its pads' mean
        seen = attention_mask.bool().cumsum(-1) > 0 if causal else attention_mask.bool().any(-1, keepdim=True)
        out = out.masked_fill(~seen[:, None, :, None], 0)
    return out.transpose(1, 2), None


def _dense(query, key, value, attention_mask, dropout, scaling, window, softcap, causal, position_ids):
    """The fallback: SDPA (or the plain formula where a softcap applies) with the explicit
    (B, 1, Sq, Sk) mask of what limits the keys (causal from the cache offset, window, documents of
    the position ids, padding); no mask where nothing does (one decoding query without padding)."""
    sq, sk = query.shape[2], key.shape[2]
    ids = None if position_ids is None else position_runs(position_ids.expand(query.shape[0], -1))
    limited = (causal and sq > 1) or (window is not None and window < sk) or ids is not None
    mask = allowed(sq, sk, causal, window, ids, query.device) if limited else None
    if attention_mask is None:
        return _sdpa(query, key, value, mask, dropout, scaling, softcap)
    keys = attention_mask.bool()[:, None, None, -sk:]
    mask = keys if mask is None else mask & keys
    # a query that sees no key (left padding) gets a zero output, as torch's SDPA gives it: its
    # logits still count in the loss (the last pad predicts the first token). It sees every key in
    # the softmax, so no NaN arises to spread through 0-weights, and the zeros replace the result.
    blind = ~mask.any(-1, keepdim=True)
    out = _sdpa(query, key, value, mask | blind, dropout, scaling, softcap)
    return out.masked_fill(blind[:, 0, :, :, None], 0)


def _sdpa(query, key, value, mask, dropout, scaling, softcap):
    """SDPA with a (B, 1, Sq, Sk) mask (boolean, or additive float) or None, or the plain formula
    where a softcap applies."""
    group = query.shape[1] // key.shape[1]
    if softcap is None and mask is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, enable_gqa=group > 1)
        return out.transpose(1, 2)
    # SDPA's fused backends take a mask only without enable_gqa: repeat k/v, as transformers does
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                              scale=scaling).transpose(1, 2)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # an additive float mask (a 4-D one the caller built), as SDPA takes it
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2)
