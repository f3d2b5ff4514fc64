"""The `fusetune` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings


INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


def _quiet(args) -> None:
    """The libraries' chatter off for a command's run (--verbose keeps it): progress bars (weights
    loaded, shards written), the deprecation notices transformers and PEFT raise about each other,
    bitsandbytes' optional-kernel warnings. fusetune's own lines, transformers' warnings (a load
    report of missing or unexpected weights) and every error stay."""
    if getattr(args, "verbose", False):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for module in ("transformers", "peft", "torch", "trl", "accelerate"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _cmd_env(args) -> int:
    from fusetune.training.env import format_probe, probe

    info = probe()
    print(json.dumps(info, indent=2) if args.json else format_probe(info))
    return 0


def _cmd_train(args) -> int:
    from fusetune.recipe.batch_size import OutOfMemory
    from fusetune.recipe.config import ConfigError, default_config_text, load_config

    if args.print_default:
        print(default_config_text(), end="")
        return 0
    if args.print_reference:
        from fusetune.recipe.config import reference

        print(reference())
        return 0
    _quiet(args)
    from fusetune.training import distributed

    if not distributed.launched_ranks().main:  # a data-parallel process other than rank 0: its errors only
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
        logging.getLogger("fusetune").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    try:
        config = load_config(args.config, args.set)
        if args.config:  # a grpo stage's reward function may live beside the config (rewards.py)
            sys.path.insert(0, os.path.dirname(os.path.abspath(args.config)))
        from fusetune.recipe.config import Recipe
        from fusetune.recipe.loop import TrainingInterrupted

        if args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: at least one process")
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _launch_processes(args, config)
        if isinstance(config, Recipe):
            from fusetune.recipe.stages import run_recipe

            run_recipe(config)
        else:
            from fusetune.recipe.train import run_train

            run_train(config)
    except (ConfigError, ImportError, OSError, OutOfMemory, ValueError, NotImplementedError) as err:
        print(f"fusetune train: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"fusetune train: {err}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt as err:
        print(f"\nfusetune train: stopped at once ({err or 'SIGINT'}); the saves that completed are intact, and the "
              f"same command resumes from the newest checkpoint if one was written", file=sys.stderr)
        return INTERRUPTED
    finally:
        distributed.finish(distributed.launched_ranks())
    return 0


def _launch_processes(args, config) -> int:
    """`fusetune train --nproc N`: the same command in N processes under torchrun (one per GPU, or
    CPU processes on gloo without GPUs); their exit code (0 when all finished)."""
    import signal
    import subprocess

    import torch

    from fusetune.recipe.config import ConfigError, Recipe
    from fusetune.recipe.train import check_data_parallel
    from fusetune.training.distributed import Ranks

    check_data_parallel(config, Ranks(world=args.nproc), recipe_stage=isinstance(config, Recipe))  # once, not N times
    if torch.cuda.is_available() and torch.cuda.device_count() < args.nproc:
        raise ConfigError(f"--nproc {args.nproc} asks for a process per GPU, but {torch.cuda.device_count()} GPUs are "
                          f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "fusetune.cli", *(["--verbose"] if args.verbose else []), "train",
               *([args.config] if args.config else []), *(a for item in args.set for a in ("--set", item))]
    # torchrun would pin every process to one thread: share the cores instead (CPU processes)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc)), **os.environ}
    launcher = subprocess.Popen(command, env=env)
    # torchrun passes Ctrl-C and SIGTERM to the processes, which stop at the next step with a checkpoint:
    # a terminal's Ctrl-C reaches it directly (so it is not sent twice), a SIGTERM to this process is passed on
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: launcher.send_signal(signum))}
    try:
        return launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(command: str, args, job) -> int:
    """A sub-command's job, quiet unless --verbose; a user's error (a bad config, file or value, a
    missing package) is one line and exit code 2 (ConfigError is a ValueError), Ctrl-C is 130."""
    _quiet(args)
    try:
        return job() or 0
    except (ImportError, OSError, ValueError) as err:
        print(f"fusetune {command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return INTERRUPTED


def _cmd_eval(args) -> int:
    def job():
        from pathlib import Path

        from fusetune.recipe.config import Recipe, load_config
        from fusetune.recipe.evaluation import run_eval

        config = load_config(args.config, args.set)
        if isinstance(config, Recipe):  # the recipe's result: its last stage
            name, _, config = config.stages[-1]
            config.output.dir = str(Path(config.output.dir) / name)
        run_eval(config)

    return _run("eval", args, job)


def _cmd_plan(args) -> int:
    def job():
        import torch

        from fusetune.recipe.config import load_config
        from fusetune.recipe.plan import run_plan

        try:
            run_plan(load_config(args.config, args.set), gpu_gib=args.gpu_memory, probe_lengths=args.probe,
                     verify=not args.no_check, processes=args.nproc)
        except torch.cuda.OutOfMemoryError as err:  # a probe's: the message says what to change
            raise ValueError(str(err)) from None

    return _run("plan", args, job)


def _probe_lengths(text: str) -> tuple[int, int]:
    try:
        short, long = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: two lengths in tokens, e.g. 4096,8192") from None
    if not 0 < short < long:
        raise argparse.ArgumentTypeError(f"{text!r}: two lengths, the shorter first, e.g. 4096,8192")
    return short, long


def _cmd_chat(args) -> int:
    def job():
        from fusetune.recipe.chat import run_chat

        return run_chat(args.source, args.max_new_tokens, args.system)

    return _run("chat", args, job)


def _cmd_data(args) -> int:
    def job():  # a ValueError here may be datasketch's, for a threshold outside 0-1
        from fusetune.recipe.cleaning import Filters, run_clean

        run_clean(args.source, args.target, Filters(min_chars=args.min_chars, min_hangul=args.min_hangul,
                                                    max_repetition=args.max_repetition,
                                                    near_duplicates=args.near_duplicates))

    return _run("data", args, job)


def _cmd_tokenizer(args) -> int:
    def job():
        from fusetune.recipe.tokenizer_tools import run_tokenizer_report

        run_tokenizer_report(args.data, args.model, args.add, args.out)

    return _run("tokenizer", args, job)


def _cmd_export(args) -> int:
    """A saved LoRA adapter (+ its base model) -> a merged model directory, or a GGUF file."""
    from pathlib import Path

    _quiet(args)

    import torch

    from fusetune.api.gguf import check_method, save_gguf
    from fusetune.api.saving import save_merged

    adapter = Path(args.adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        print(f"fusetune export: {adapter} has no adapter_config.json: give the directory a LoRA adapter was saved "
              f"to (save_pretrained / save_method='lora')", file=sys.stderr)
        return 2
    base = args.base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        print("fusetune export: the adapter does not name its base model: pass --base DIR", file=sys.stderr)
        return 2
    if Path(args.out).resolve() in (Path(base).resolve(), adapter.resolve()):
        print(f"fusetune export: the output {args.out} is the folder of the base model or the adapter it reads; "
              f"writing there would replace them: choose another output folder", file=sys.stderr)
        return 2
    from fusetune.api.model import FastModel, load_adapter

    dtype = getattr(torch, args.dtype)
    try:
        if args.gguf:
            check_method(args.gguf)
        # as from_pretrained(adapter folder) loads it (its length, RoPE, added tokens, trained head), on the
        # CPU; a GGUF is merged in float32 and rounded once, to its own method
        model, tokenizer = load_adapter(adapter, dict(
            tokenizer=None, rope_scaling=None, max_seq_length=None, device_map={"": "cpu"},
            dtype=torch.float32 if args.gguf else dtype), FastModel, base=args.base)
    except (OSError, ImportError) as err:
        print(f"fusetune export: {err} (pass --base to name the base model's folder)", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"fusetune export: {err}", file=sys.stderr)
        return 2
    try:
        if args.gguf:
            out = save_gguf(model, args.out, tokenizer, args.gguf)
        else:
            out = save_merged(model, args.out, tokenizer, save_method=args.save_method, dtype=dtype)
    except (OSError, ValueError, ImportError, NotImplementedError, RuntimeError) as err:
        print(f"fusetune export: {err}", file=sys.stderr)
        return 2
    print(f"fusetune export: wrote {out}")
    return 0


BENCHMARKS = {"kernels": "kernels.py", "e2e": "e2e.py", "qlora-dequant": "nf4_dequant.py", "gemv": "nf4_gemv.py",
              "plan": "plan.py", "report": "report.py"}


def _cmd_bench(args) -> int:
    """Runs bench/<script> of the source checkout fusetune is installed from (pip install -e .)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    script = root / "bench" / BENCHMARKS[args.which]
    if not script.is_file():
        print("fusetune bench: the benchmarks live in the source repository (bench/ is not installed with the "
              "package): clone it and pip install -e . there", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.args], cwd=root)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: a count, 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    from fusetune.version import __version__

    parser = argparse.ArgumentParser(prog="fusetune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fusetune {__version__}")
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' own warnings, info lines and "
                                                               "progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print GPUs, versions and the backend each op would use")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.set_defaults(func=_cmd_env)
    train = sub.add_parser("train", help="LoRA fine-tune from a YAML config (none: the embedded default, "
                                         "SmolLM2-135M-Instruct on the bundled instructions)")
    train.add_argument("config", nargs="?", default=None, help="YAML config (sections model, data, lora, training, "
                                                               "output); see --print-default")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one key, e.g. --set training.max_steps=10 (repeatable)")
    train.add_argument("--nproc", type=_count, default=1, metavar="N", help="data parallel: N processes under torchrun, "
                       "one per GPU (CPU processes on gloo without GPUs), each training its share of every batch")
    train.add_argument("--print-default", action="store_true", help="print the embedded default config and exit")
    train.add_argument("--print-reference", action="store_true", help="print every config key with its default and "
                                                                      "meaning (docs/CONFIG.md) and exit")
    train.set_defaults(func=_cmd_train)
    plan = sub.add_parser("plan", help="the longest row a config's model trains on this GPU at batch 1: two short "
                                       "steps measure GPU (and pinned host) memory per token, one step at the "
                                       "projected length checks it")
    plan.add_argument("config", nargs="?", default=None, help="the YAML config to train (none: the embedded default)")
    plan.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one key, e.g. --set model.load_in_4bit=true (repeatable)")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                      help="plan for this much GPU memory in GiB (the allocator is capped there while planning), "
                           "e.g. 80 on a larger GPU")
    plan.add_argument("--probe", type=_probe_lengths, default=(4096, 8192), metavar="SHORT,LONG",
                      help="the two measured lengths in tokens (default 4096,8192)")
    plan.add_argument("--no-check", action="store_true", help="report the projection without running a step at it")
    plan.add_argument("--nproc", type=_count, default=1, metavar="N", help="plan for `fusetune train --nproc N`: each "
                      "of the N processes offloads into 1/N of this host's memory")
    plan.set_defaults(func=_cmd_plan)
    evaluate = sub.add_parser("eval", help="evaluate the adapter a config trained (or its base model): eval loss "
                                           "and perplexity on the held-out rows, multiple-choice accuracy, ROUGE "
                                           "of answers to data.generation_path")
    evaluate.add_argument("config", nargs="?", default=None, help="the YAML config it was trained with (none: the "
                                                                  "embedded default)")
    evaluate.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override one key, e.g. --set data.choices_path=kmmlu.jsonl (repeatable)")
    evaluate.set_defaults(func=_cmd_eval)
    data = sub.add_parser("data", help="clean a data file: normalise (NFKC, HTML, spaces), drop short, non-Korean or "
                                       "repetitive rows and duplicates; writes JSONL and a report")
    data.add_argument("source", help="a data file fusetune train reads (.jsonl, .json, .csv, .parquet)")
    data.add_argument("target", help="the cleaned JSONL to write (and TARGET.report.json)")
    data.add_argument("--min-chars", type=int, default=1, help="drop rows with less text (default 1)")
    data.add_argument("--min-hangul", type=float, default=None, help="drop rows whose letters are less Hangul than "
                                                                     "this share, e.g. 0.3")
    data.add_argument("--max-repetition", type=float, default=0.5, help="drop rows whose word 3-grams repeat more "
                                                                        "than this share (default 0.5)")
    data.add_argument("--near-duplicates", type=float, default=None, metavar="JACCARD",
                      help="drop near duplicates above this MinHash similarity, e.g. 0.85 (pip install datasketch)")
    data.set_defaults(func=_cmd_data)
    tokens = sub.add_parser("tokenizer", help="how many characters and bytes a token carries, by script (Hangul, "
                                             "Latin, digits), on your data; --add N picks the words to add")
    tokens.add_argument("data", help="a data file fusetune train reads")
    tokens.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer (default: the built-in)")
    tokens.add_argument("--add", type=_count, default=0, metavar="N", help="add the N words that save the most tokens "
                                                                        "and compare")
    tokens.add_argument("--out", default=None, help="write tokens.json, tokens.png and new_tokens.txt here")
    tokens.set_defaults(func=_cmd_tokenizer)
    chat = sub.add_parser("chat", help="talk to a trained model in the terminal: the adapter in a `fusetune train` "
                                       "output folder, an adapter or model folder, or a model name")
    chat.add_argument("source", help="OUTPUT_DIR of fusetune train (its adapter), or a model/adapter folder or name")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--system", default=None, help="a system message to start each conversation with")
    chat.set_defaults(func=_cmd_chat)
    export = sub.add_parser("export", help="merge a saved LoRA adapter into its base model: safetensors (16 or "
                                           "4 bit) or a GGUF file")
    export.add_argument("adapter", help="directory of a saved LoRA adapter")
    export.add_argument("out", help="directory to write the merged model to (replaced atomically)")
    export.add_argument("--base", default=None, help="base model (default: the one the adapter names)")
    export.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the merged safetensors' dtype (a GGUF is merged in float32 and rounded to its METHOD)")
    export.add_argument("--save-method", default="merged_16bit", choices=["merged_16bit", "merged_4bit"])
    export.add_argument("--gguf", default=None, metavar="METHOD",
                        help="write OUT/model.METHOD.gguf instead (f16, bf16, q8_0, q4_0, ...; k-quants need "
                             "llama-quantize)")
    export.set_defaults(func=_cmd_export)
    bench = sub.add_parser("bench", help="run a benchmark of the source checkout (GPU): kernels, e2e, qlora-dequant, "
                                         "gemv, plan, or report (bench/REPORT.md and plots from bench/results)")
    bench.add_argument("which", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script, e.g. --workloads W1,W2")
    bench.set_defaults(func=_cmd_bench)
    for command in (train, plan, evaluate, chat, export, tokens, data):  # `fusetune train --verbose` as well as `fusetune --verbose train`
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="keep the libraries' own warnings, info lines and progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
