"""fusetune: fused Triton kernels for fine-tuning Hugging Face language models.

Everything is imported on first use (PEP 562), so `import fusetune` and `fusetune --help` do not
pay for torch, transformers or PEFT until a name that needs them is asked for.
"""
import importlib

from fusetune.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "BackendUnavailableError": "fusetune.backend", "get_backend": "fusetune.backend",
    "set_backend": "fusetune.backend", "use_backend": "fusetune.backend",
    "attention": "fusetune.ops", "cross_entropy": "fusetune.ops", "geglu": "fusetune.ops", "linear_cross_entropy": "fusetune.ops",
    "rms_norm": "fusetune.ops", "rope": "fusetune.ops", "swiglu": "fusetune.ops",
    "patch_model": "fusetune.patching", "unpatch_model": "fusetune.patching",
    "FastLanguageModel": "fusetune.api", "FastModel": "fusetune.api",
    "PackingCollator": "fusetune.training.packing", "pack_examples": "fusetune.training.packing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fusetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
