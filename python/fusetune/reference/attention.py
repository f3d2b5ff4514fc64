import torch


def allowed(sq: int, sk: int, causal: bool, window: int | None, segment_ids: torch.Tensor | None,
            device=None) -> torch.Tensor:
    """The (B or 1, 1, Sq, Sk) boolean mask of keys each query may see: causal (query i at position
    i + Sk - Sq), a sliding window (position - key < window) and packed documents (runs of equal
    segment ids; Sq == Sk)."""
    pos = torch.arange(sq, device=device)[:, None] + (sk - sq)
    key = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        ok &= key <= pos
    if window:
        ok &= pos - key < window
    ok = ok[None, None]
    if segment_ids is not None:
        runs = torch.cat([torch.zeros_like(segment_ids[:, :1]),
                          (segment_ids[:, 1:] != segment_ids[:, :-1]).cumsum(1)], dim=1)
        ok = ok & (runs[:, None, :, None] == runs[:, None, None, :])
    return ok


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
              softcap: float | None = None, window: int | None = None, segment_ids: torch.Tensor | None = None):
    """softmax(mask(c * tanh(scale * q k^T / c))) v, in q's dtype (computed in fp32 or float64).

    q (B, Hq, Sq, D), k and v (B, Hk, Sk, D), Hq a multiple of Hk (GQA: query head h reads key head
    h // (Hq / Hk)); the mask as `allowed`. Returns (out (B, Hq, Sq, D), lse (B, Hq, Sq), natural log).
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = (t.to(compute).repeat_interleave(group, dim=1) for t in (k, v))
    x = q.to(compute) @ k.transpose(-1, -2) * scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    x = x.masked_fill(~allowed(q.shape[2], k.shape[2], causal, window, segment_ids, q.device), float("-inf"))
    lse = torch.logsumexp(x, dim=-1)
    return (torch.softmax(x, dim=-1) @ v).to(q.dtype), lse
