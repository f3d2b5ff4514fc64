"""Hardware and software probe: what `fusetune env` prints."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "trl")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        out.append({"index": index, "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count,
                    "bf16": torch.cuda.is_bf16_supported()})
    return out


def backend_report(device: torch.device | str) -> dict[str, str]:
    """Which backend each op would use on `device` (or why it cannot run) under the current request."""
    from fusetune.backend import BackendUnavailableError, resolve
    from fusetune.ops import OPS

    device = torch.device(device)
    out = {}
    for op, cuda_ops in OPS.items():
        try:
            out[op] = resolve(op, device, cuda_ops)
        except BackendUnavailableError as err:
            out[op] = f"unavailable ({err})"
    return out


def probe() -> dict:
    from fusetune.backend import cuda_extension, get_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "gpus": gpus(),
        "packages": package_versions(),
        "cuda_extension": "built" if cuda_extension() is not None else "not built",
        "backend_requested": get_backend(),
        "ops_on_" + device: backend_report(device),
    }


def format_probe(info: dict) -> str:
    lines = [f"python        {info['python']} on {info['platform']}", f"cuda          {info['cuda']}"]
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"gpu {g['index']}         {g['name']}, compute capability {g['capability']}, "
                         f"{g['memory_gib']} GiB, {g['multiprocessors']} SMs, bf16 "
                         f"{'yes' if g['bf16'] else 'no'}")
    else:
        lines.append("gpu           none found (ops run on the torch backend, or Triton's "
                     "interpreter with TRITON_INTERPRET=1)")
    for name, version in info["packages"].items():
        lines.append(f"{name:<13} {version}")
    lines.append(f"fusetune._C   {info['cuda_extension']}")
    lines.append(f"backend       {info['backend_requested']} (FUSETUNE_BACKEND)")
    key = next(k for k in info if k.startswith("ops_on_"))
    for op, backend in info[key].items():
        lines.append(f"  {op:<14} -> {backend}  [{key[7:]}]")
    return "\n".join(lines)
