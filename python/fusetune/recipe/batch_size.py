"""The batch-size finder: the largest micro-batch whose forward + backward fits in GPU memory, and,
when not even one row fits, the longest row that does (for the error message)."""
from __future__ import annotations

import gc
from typing import Callable

import torch


class OutOfMemory(RuntimeError):
    """Even the smallest setting does not fit; the message says what to change."""


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_micro_batch(fits: Callable[[int], None], upper: int, log=print) -> int:
    """Largest m in [1, upper] for which fits(m) returns without torch.cuda.OutOfMemoryError.

    Tries upper, halves on out-of-memory until one fits, then bisects between the size that fit
    and the smallest that did not. Memory is released after every trial."""
    fit, fail = 0, upper + 1
    size = upper
    while fail - fit > 1:
        try:
            fits(size)
            fit = size
            log(f"batch-size finder: micro-batch {size} fits")
        except torch.cuda.OutOfMemoryError:
            fail = size
            log(f"batch-size finder: micro-batch {size} is out of memory")
        _release()
        size = fail // 2 if fit == 0 else (fit + fail) // 2
        if size == 0:
            raise OutOfMemory("out of GPU memory with a micro-batch of 1: lower model.max_seq_length, set "
                              "model.load_in_4bit: true, or turn on lora.gradient_checkpointing: fusetune")
    return fit


def find_longest(fits: Callable[[int], None], length: int, step: int = 256, log=print) -> int:
    """Longest n below `length`, a multiple of `step`, for which fits(n) returns without
    torch.cuda.OutOfMemoryError (fits(length) is known to fail); 0 when not even `step` fits.
    Halves until one fits, then bisects to `step`. Memory is released after every trial."""
    fit, fail = 0, length
    n = length // 2 // step * step
    while n > fit:
        try:
            fits(n)
            fit = n
            log(f"sequence finder: {n} tokens fit")
        except torch.cuda.OutOfMemoryError:
            fail = n
            log(f"sequence finder: {n} tokens are out of memory")
        _release()
        n = fail // 2 // step * step if fit == 0 else (fit + fail) // 2 // step * step
    return fit
