"""The `fusetune` command."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_env(args) -> int:
    from fusetune.training.env import format_probe, probe

    info = probe()
    print(json.dumps(info, indent=2) if args.json else format_probe(info))
    return 0


def _cmd_train(args) -> int:
    from fusetune.training.quickstart import run

    result = run(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                 device=args.device)
    if not result["last_loss"] < result["first_loss"]:
        print("warning: the loss did not fall; something is wrong", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print GPUs, versions and the backend each op would use")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.set_defaults(func=_cmd_env)
    train = sub.add_parser("train", help="the quick-start: LoRA fine-tune of a tiny Llama built "
                                         "from a config on the bundled text")
    train.add_argument("--steps", type=int, default=60)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
