"""Ops: one file each, an autograd Function over the kernels plus a functional API that picks a backend.

OPS maps each op name to the torch.ops.fusetune operators its CUDA C++ path needs (empty: none yet).
"""
from fusetune.ops import rms_norm as _rms_norm_module
from fusetune.ops.rms_norm import rms_norm

OPS = {
    "rms_norm": _rms_norm_module.CUDA_OPS,
}

__all__ = ["OPS", "rms_norm"]
