import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    compute = torch.promote_types(x.dtype, torch.float32)
    x_rot, x_pass = x[..., :rd].to(compute), x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    rotated = x_rot * cos.to(compute) + torch.cat((-x2, x1), dim=-1) * sin.to(compute)
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding as Hugging Face's apply_rotary_pos_emb (rotate_half convention).

    q (B, Hq, S, D), k (B, Hk, S, D); cos, sin (B, S, rd), (1, S, rd) or (S, rd), already gathered
    per token. The first rd dims of each head rotate, the other D - rd pass through (partial
    rotary). Computed in fp32 (or float64), each output in its input's dtype.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
