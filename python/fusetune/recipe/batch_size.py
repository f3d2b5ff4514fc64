"""The batch-size finder: the largest micro-batch whose forward + backward fits in GPU memory, and,
when not even one row fits, the longest row that does (for the error message)."""
from __future__ import annotations

from typing import Callable

import torch

from fusetune.training.plan import release_memory


class OutOfMemory(RuntimeError):
    """Even the smallest setting does not fit; the message says what to change."""


NOT_EVEN_ONE = ("out of GPU memory with a micro-batch of 1: lower model.max_seq_length, set model.load_in_4bit: true, "
                "or turn on lora.gradient_checkpointing: fusetune")


def _largest_that_fits(fits: Callable[[int], None], first: int, fail: int, step: int, says: str, log) -> int:
    """Largest n < fail, a multiple of step, for which fits(n) returns without
    torch.cuda.OutOfMemoryError, or 0: tries `first`, halves on out-of-memory until one fits, then
    bisects between the largest that fit and the smallest that did not. Memory is released after
    every trial; says.format(n=n, result=...) is logged for each."""
    fit, n = 0, first
    while n > fit:
        try:
            fits(n)
            fit = n
            log(says.format(n=n, result="fits"))
        except torch.cuda.OutOfMemoryError:
            fail = n
            log(says.format(n=n, result="is out of memory"))
        release_memory()
        n = (fail // 2 if fit == 0 else (fit + fail) // 2) // step * step
    return fit


def find_micro_batch(fits: Callable[[int], None], upper: int, log=print) -> int:
    """Largest m in [1, upper] for which fits(m) returns without torch.cuda.OutOfMemoryError: upper
    first, halved on out-of-memory until one fits, then bisected."""
    size = _largest_that_fits(fits, upper, upper + 1, 1, "batch-size finder: micro-batch {n} {result}", log)
    if size == 0:
        raise OutOfMemory(NOT_EVEN_ONE)
    return size


def size_micro_batch(fits: Callable[[int], None], chosen: int | None, upper: int, log=print) -> int:
    """The finder's size up to `upper` (chosen None), or the largest up to `chosen`: chosen itself
    when fits(chosen) returns, else the finder's below it (a size that is set is checked once on
    the longest rows, so that it fails now rather than at the step that draws them)."""
    if chosen is None:
        return find_micro_batch(fits, upper, log)
    try:
        fits(chosen)
        return chosen
    except torch.cuda.OutOfMemoryError:
        log(f"batch-size check: micro-batch {chosen} is out of memory")
    release_memory()
    if chosen == 1:
        raise OutOfMemory(NOT_EVEN_ONE)
    return find_micro_batch(fits, chosen - 1, log)


def find_longest(fits: Callable[[int], None], length: int, step: int = 256, log=print) -> int:
    """Longest n below `length`, a multiple of `step`, for which fits(n) returns without
    torch.cuda.OutOfMemoryError (fits(length) is known to fail); 0 when not even `step` fits.
    Half of length first (at least `step`), then as find_micro_batch."""
    first = max(step, length // 2 // step * step) if length > step else 0
    return _largest_that_fits(fits, first, length, step, "sequence finder: {n} tokens {result}", log)
