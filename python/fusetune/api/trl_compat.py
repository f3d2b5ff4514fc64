"""Older TRL arguments, as the fine-tuning guides write them, on today's TRL.

TRL 1.x renamed or moved arguments that guides still pass: `SFTTrainer(tokenizer=...)` is
`processing_class`, `SFTConfig(max_seq_length=...)` is `max_length`, and `SFTTrainer(
dataset_text_field=..., max_seq_length=..., packing=..., dataset_num_proc=...)` belong to its
config. While this layer is on, those calls are translated (one line says so, once per argument)
and everything else reaches TRL unchanged; an argument the installed TRL still accepts is left
alone. An SFT, DPO, KTO, ORPO or reward trainer of a model loaded by
FastLanguageModel.from_pretrained truncates at the model's max_seq_length where the user set no
length (not at TRL's default max_length, 1024, which cuts longer examples silently); a length the
user gave wins. Likewise a model get_peft_model prepared with use_gradient_checkpointing=False
trains without checkpointing (TRL's configs default to it) unless the config asks for it. A trainer
that puts LoRA on such a model itself (peft_config=...) saves fusetune.json beside the adapter, as
get_peft_model's does. It rewrites no source: it wraps the classes' __init__ when TRL's modules
load (an import hook, so fusetune never imports TRL itself) and `disable()` restores them.

On from the moment fusetune's facade is imported (`from fusetune import FastLanguageModel`, as guides
start); FUSETUNE_TRL_COMPAT=0 keeps it off.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import importlib.machinery
import inspect
import os
import sys

TRAINERS = ("SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "ORPOTrainer", "CPOTrainer", "RewardTrainer",
            "RLOOTrainer", "PPOTrainer")
RENAMED = {"SFTConfig": {"max_seq_length": "max_length"},
           **{name: {"tokenizer": "processing_class"} for name in TRAINERS}}
# SFTTrainer arguments of older TRL that live in SFTConfig now (old name -> the config's)
TO_CONFIG = {"SFTTrainer": {"dataset_text_field": "dataset_text_field", "max_seq_length": "max_length",
                            "packing": "packing", "dataset_num_proc": "dataset_num_proc",
                            "dataset_kwargs": "dataset_kwargs"}}
# trainer -> its config class, whose defaults give way to the model's settings where the user set none:
# gradient_checkpointing to get_peft_model's use_gradient_checkpointing=False, and (LENGTH_FROM_MODEL)
# max_length to the max_seq_length the model was loaded with
CONFIGS = {"SFTTrainer": "SFTConfig", "DPOTrainer": "DPOConfig", "KTOTrainer": "KTOConfig", "GRPOTrainer": "GRPOConfig",
           "ORPOTrainer": "ORPOConfig", "RewardTrainer": "RewardConfig", "RLOOTrainer": "RLOOConfig"}
LENGTH_FROM_MODEL = ("SFTTrainer", "DPOTrainer", "KTOTrainer", "ORPOTrainer", "RewardTrainer")
GIVEN = "_fusetune_given"  # a config's attribute: the arguments its caller passed (from the defaults)
_said: set[tuple[str, str]] = set()
_wrapped: dict[type, object] = {}  # class -> its own __init__


def _say_once(cls_name: str, old: str, where: str) -> None:
    if (cls_name, old) not in _said:
        _said.add((cls_name, old))
        print(f"fusetune: {cls_name}({old}=...) is {where} in the installed TRL; passed there "
              f"(fusetune.api.trl_compat.disable() turns this translation off)")


def _translating(cls: type):
    original = cls.__init__
    signature = inspect.signature(original)
    accepted = set(signature.parameters)
    renamed = {old: new for old, new in RENAMED.get(cls.__name__, {}).items() if old not in accepted}
    to_config = {old: new for old, new in TO_CONFIG.get(cls.__name__, {}).items() if old not in accepted}
    records = cls.__name__ in CONFIGS.values()
    config_name = CONFIGS.get(cls.__name__)
    if not (renamed or to_config or records or cls.__name__ in TRAINERS):
        return None

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        for old, new in renamed.items():
            if old in kwargs and new not in kwargs:
                _say_once(cls.__name__, old, new)
                kwargs[new] = kwargs.pop(old)
        moved = {new: kwargs.pop(old) for old, new in to_config.items() if old in kwargs}
        if moved or config_name:
            bound = signature.bind_partial(self, *args, **kwargs)
            config = bound.arguments.get("args")
            if moved and config is None:
                raise TypeError(f"{cls.__name__}({', '.join(moved)}=...): the installed TRL takes these in its "
                                f"config: pass args=SFTConfig(output_dir=..., {', '.join(f'{k}=...' for k in moved)})")
            for old, new in to_config.items():
                if new in moved:
                    _say_once(cls.__name__, old, f"args.{new}")
            module = sys.modules[cls.__module__]
            model = bound.arguments.get("model")
            config_cls = getattr(module, config_name) if config_name else None
            from_model = _from_model(cls.__name__, config_cls, model, config, "max_length" in moved) \
                if config_cls is not None else {}
            if from_model and config is None:  # TRL's default config, named as TRL names it
                name = (getattr(model.config, "_name_or_path", "") or "").split("/")[-1]
                config = config_cls(output_dir=f"{name}-{cls.__name__.removesuffix('Trainer')}")
            moved.update(from_model)
            if moved:
                bound.arguments["args"] = _config_with(config_cls, config, moved)
                args, kwargs = bound.args[1:], bound.kwargs
        original(self, *args, **kwargs)
        _keep_load_settings(getattr(self, "model", None))
        if records:
            setattr(self, GIVEN, frozenset(signature.bind_partial(self, *args, **kwargs).arguments) - {"self"})

    return __init__


def _keep_load_settings(model) -> None:
    """A trainer that put LoRA on a FastLanguageModel model itself (peft_config=...): its saves write
    the load settings (max_seq_length, RoPE) beside the adapter, as get_peft_model's model's do, so
    from_pretrained(adapter folder) rebuilds the model that trained."""
    if model is None or not hasattr(model, "peft_config") or "save_pretrained" in vars(model):
        return
    if isinstance(getattr(model, "max_seq_length", None), int):  # loaded by FastLanguageModel
        from fusetune.api.model import attach_saving

        attach_saving(model)


def _from_model(trainer: str, config_cls, model, config, length_given: bool) -> dict:
    """The config values the model's settings give where the user set none (each said once):
    max_length = the max_seq_length FastLanguageModel.from_pretrained loaded it for (a PEFT model
    passes it on) where TRL's default would cut longer rows; gradient_checkpointing = False where
    get_peft_model was told use_gradient_checkpointing=False (TRL's configs default to True)."""
    values = {}
    length = getattr(model, "max_seq_length", None)
    if trainer in LENGTH_FROM_MODEL and not length_given and isinstance(length, int) \
            and not _user_set(config_cls, config, "max_length", length):
        values["max_length"] = length
        print(f"fusetune: {trainer}: max_length={length}, the max_seq_length the model was loaded with (TRL's "
              f"default, {_default(config_cls, 'max_length')}, would cut longer examples); "
              f"{config_cls.__name__}(max_length=...) sets another")
    # (transformers >= 5.24 names it activation_checkpointing, default None: the old name's value)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    newer = "activation_checkpointing" in fields
    if getattr(model, "_fusetune_checkpointing", None) is False \
            and not _user_set(config_cls, config, "gradient_checkpointing", False) \
            and not (newer and "activation_checkpointing" in getattr(config, GIVEN, ())):
        values.update(dict.fromkeys(["gradient_checkpointing"] + ["activation_checkpointing"] * newer, False))
        print(f"fusetune: {trainer}: gradient_checkpointing=False, as get_peft_model(use_gradient_checkpointing=False) "
              f"chose (TRL's default, True, would recompute every layer); {config_cls.__name__}("
              f"gradient_checkpointing=True) sets it")
    return values


def _default(config_cls, field: str):
    """The field's default (None where the config has no such field)."""
    return {f.name: f.default for f in dataclasses.fields(config_cls)}.get(field)


def _user_set(config_cls, config, field: str, model_value) -> bool:
    """Whether `field` is the user's (passed to the config, or not its default: set by assignment, or
    on a config made before this layer was on), or the model's value is the default anyway."""
    default = _default(config_cls, field)
    if model_value == default:
        return True
    return isinstance(config, config_cls) and (field in getattr(config, GIVEN, ()) or getattr(config, field) != default)


def _config_with(config_cls, config, values: dict):
    """A copy of the trainer's config with `values` set; a plain TrainingArguments (which TRL would
    turn into its config, dropping anything set on it by hand) becomes that config first. The
    caller's object is left as it was."""
    if isinstance(config, config_cls):
        return dataclasses.replace(config, **values)
    fields = config.to_dict()
    fields["hub_token"] = getattr(config, "hub_token", None)  # to_dict hides it
    fields.pop("push_to_hub_token", None)
    accepted = {f.name for f in dataclasses.fields(config_cls) if f.init}
    return config_cls(**{k: v for k, v in fields.items() if k in accepted}, **values)


def _patch_module(module) -> None:
    for name in RENAMED.keys() | TO_CONFIG.keys() | CONFIGS.keys() | set(CONFIGS.values()):
        cls = module.__dict__.get(name)
        if isinstance(cls, type) and cls.__module__ == module.__name__ and cls not in _wrapped:
            wrapper = _translating(cls)
            if wrapper is not None:
                _wrapped[cls] = cls.__init__
                cls.__init__ = wrapper


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_code, get_source, is_package, get_data...: the wrapped loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _patch_module(module)


class _TRLImportHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of every trl.* module so its classes are translated once loaded."""

    def find_spec(self, name, path, target=None):
        if not name.startswith("trl."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


_hook = _TRLImportHook()


def enable() -> None:
    """Translate older TRL arguments from now on (TRL modules loaded already are patched now)."""
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
    for name, module in list(sys.modules.items()):
        if name.startswith("trl.") and module is not None:
            _patch_module(module)


def disable() -> None:
    """Stop translating: TRL's classes get their own __init__ back."""
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    for cls, original in _wrapped.items():
        cls.__init__ = original
    _wrapped.clear()


if os.environ.get("FUSETUNE_TRL_COMPAT", "1") != "0":
    enable()
