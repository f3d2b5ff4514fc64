"""Triton kernels of fusetune: @triton.jit kernels and plain launch functions, one file per op.

No autograd, no nn.Module and no transformers here; python/fusetune/ops wraps these.
"""
