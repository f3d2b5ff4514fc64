"""Ops: one file each, an autograd Function over the kernels plus a functional API that picks a backend.

OPS maps each op name to the torch.ops.fusetune operators its CUDA C++ path needs (empty: none yet).
"""
from fusetune.ops import rms_norm as _rms_norm_module
from fusetune.ops.cross_entropy import cross_entropy
from fusetune.ops.glu import geglu, swiglu
from fusetune.ops.linear_cross_entropy import linear_cross_entropy
from fusetune.ops.rms_norm import rms_norm
from fusetune.ops.rope import rope

OPS = {
    "rms_norm": _rms_norm_module.CUDA_OPS,
    "swiglu": (),
    "geglu": (),
    "rope": (),
    "cross_entropy": (),
    "linear_cross_entropy": (),
}

__all__ = ["OPS", "cross_entropy", "geglu", "linear_cross_entropy", "rms_norm", "rope", "swiglu"]
