"""Ops: one file each, an autograd Function over the kernels plus a functional API that picks a backend.

OPS maps each op name to the torch.ops.fusetune operators its CUDA C++ path needs (each module's
CUDA_OPS; empty: none yet).
"""
from fusetune.backend import CUDA_FIRST
from fusetune.ops import attention as _attention
from fusetune.ops import cross_entropy as _cross_entropy
from fusetune.ops import glu as _glu
from fusetune.ops import linear_cross_entropy as _linear_cross_entropy
from fusetune.ops import nf4 as _nf4
from fusetune.ops import nf4_gemv as _nf4_gemv
from fusetune.ops import rms_norm as _rms_norm
from fusetune.ops import rope as _rope
from fusetune.ops.attention import attention
from fusetune.ops.cross_entropy import cross_entropy
from fusetune.ops.glu import geglu, swiglu
from fusetune.ops.linear_cross_entropy import linear_cross_entropy
from fusetune.ops.nf4 import nf4_dequant
from fusetune.ops.nf4_gemv import nf4_gemv
from fusetune.ops.rms_norm import rms_norm
from fusetune.ops.rope import rope

OPS = {
    "attention": _attention.CUDA_OPS,
    "rms_norm": _rms_norm.CUDA_OPS,
    "rope": _rope.CUDA_OPS,
    "swiglu": _glu.CUDA_OPS,
    "geglu": _glu.CUDA_OPS,
    "cross_entropy": _cross_entropy.CUDA_OPS,
    "linear_cross_entropy": _linear_cross_entropy.CUDA_OPS,
    "nf4_dequant": _nf4.CUDA_OPS,
    "nf4_gemv": _nf4_gemv.CUDA_OPS,
}

if CUDA_FIRST - OPS.keys():
    raise ValueError(f"FUSETUNE_CUDA_FIRST names {', '.join(sorted(CUDA_FIRST - OPS.keys()))}, which "
                     f"{'is not an op' if len(CUDA_FIRST - OPS.keys()) == 1 else 'are not ops'}; the ops: "
                     f"{', '.join(OPS)}")

__all__ = ["OPS", "attention", "cross_entropy", "geglu", "linear_cross_entropy", "nf4_dequant", "nf4_gemv", "rms_norm", "rope",
           "swiglu"]
