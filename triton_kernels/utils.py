"""Small helpers shared by the launchers."""
import functools
import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: one fixed config, no autotune, small grids."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(device: torch.device, per_sm: int = 4) -> int:
    """Programs for a persistent grid: a few per streaming multiprocessor (4 on CPU)."""
    if device.type != "cuda":
        return 4
    return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (plain int math: triton.next_power_of_2 is a constexpr
    function, slow to call on the launch path)."""
    return 1 << max(n - 1, 0).bit_length()


def row_block(n: int) -> int:
    """The power-of-two block that holds a whole row of n elements."""
    return next_power_of_2(n)


def elementwise_warps(block: int) -> int:
    return max(1, min(16, block // 256))
