"""The user-facing facade: FastLanguageModel (load, LoRA, modes, saving)."""
from fusetune.api.model import FastLanguageModel
from fusetune.api.saving import atomic_directory, merged_state_dict, save_merged

__all__ = ["FastLanguageModel", "atomic_directory", "merged_state_dict", "save_merged"]
