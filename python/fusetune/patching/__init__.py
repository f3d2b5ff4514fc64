"""patch_model / unpatch_model: fused kernels swapped into Hugging Face models in place.

core.py holds the generic machinery, modules.py the fused forwards (one per kind, for every
family), and one small spec file per family says what differs (llama.py, ..., phi3.py).
"""
from fusetune.patching.core import SPECS, SUPPORTED, UnsupportedModelError, hf_model, patch_model, unpatch_model

__all__ = ["SPECS", "SUPPORTED", "UnsupportedModelError", "hf_model", "patch_model", "unpatch_model"]
