"""fusetune: fused Triton kernels for fine-tuning Hugging Face causal language models."""
from fusetune.backend import BackendUnavailableError, get_backend, set_backend, use_backend
from fusetune.ops import cross_entropy, geglu, linear_cross_entropy, rms_norm, rope, swiglu

__version__ = "0.1.0"


def patch_model(model, **switches):
    """Swap fused modules into a Hugging Face model in place; see fusetune.patching.patch_model."""
    from fusetune.patching import patch_model as _patch_model

    return _patch_model(model, **switches)


def unpatch_model(model):
    """Undo patch_model; see fusetune.patching.unpatch_model."""
    from fusetune.patching import unpatch_model as _unpatch_model

    return _unpatch_model(model)


def __getattr__(name):
    # the facade imports transformers and PEFT: only when it is asked for
    if name == "FastLanguageModel":
        from fusetune.api import FastLanguageModel

        return FastLanguageModel
    raise AttributeError(f"module 'fusetune' has no attribute {name!r}")


__all__ = ["BackendUnavailableError", "FastLanguageModel", "cross_entropy", "geglu", "get_backend", "linear_cross_entropy", "patch_model",
           "rms_norm", "rope", "set_backend", "swiglu", "unpatch_model", "use_backend"]
