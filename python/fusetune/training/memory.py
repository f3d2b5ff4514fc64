"""Peak-memory reporting: GPU allocator peak on CUDA, process peak resident set on CPU."""
import resource
import sys

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def describe_peak(device: torch.device) -> str:
    kind = "GPU allocated" if device.type == "cuda" else "process RSS"
    return f"{peak_bytes(device) / 2**30:.2f} GiB ({kind})"
