"""The user-facing facade: FastLanguageModel (load, LoRA, modes, saving), FastModel (the same for
image-text and encoder-decoder models too), chat templates, and the translation of older TRL
arguments (trl_compat, on by default)."""
from fusetune.api import trl_compat  # noqa: F401  (installs its import hook; FUSETUNE_TRL_COMPAT=0: off)
from fusetune.api.chat import get_chat_template, train_on_responses_only
from fusetune.api.model import FastLanguageModel, FastModel
from fusetune.api.saving import merged_state_dict, save_merged
from fusetune.atomic import atomic_directory

__all__ = ["FastLanguageModel", "FastModel", "get_chat_template", "train_on_responses_only", "atomic_directory", "merged_state_dict", "save_merged"]
