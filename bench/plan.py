"""The sequence planner (`fusetune plan`, fusetune.training.plan) on the end-to-end benchmark's
models: its projection from two probes, the step it runs at the projection, and how long that took,
to set beside bench/e2e.py's W7/W7L search (which finds the longest by trying full steps).

    python bench/plan.py [--workload W7] [--memory-cap-gb 80] [--probe 4096,8192] [--no-check]

The model is e2e.py's fusetune stack (random bf16 Llama weights from the config, LoRA r=16 on every
projection, NF4 base for QLoRA, fusetune's offloaded checkpointing); the GPU memory cap is in GiB,
as e2e.py's --memory-cap-gb. Writes bench/results/plan-<workload>-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e import WORKLOADS, build_model  # noqa: E402
from fusetune.training.plan import plan_longest_sequence  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="W7", choices=sorted(WORKLOADS))
    parser.add_argument("--memory-cap-gb", type=float, default=80.0, help="GiB of GPU memory to plan for")
    parser.add_argument("--probe", default="4096,8192", help="the two measured lengths")
    parser.add_argument("--no-check", action="store_true", help="report the projection without a step there")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/plan.py needs a CUDA GPU (it measures training steps in GPU memory)", file=sys.stderr)
        return 1
    name, _, _, qlora = WORKLOADS[args.workload]
    probes = tuple(int(n) for n in args.probe.split(","))
    model = build_model("fusetune", name, qlora)
    started = time.perf_counter()
    plan = plan_longest_sequence(model, gpu_bytes=int(args.memory_cap_gb * 2**30), probe_lengths=probes,
                                 verify=not args.no_check)
    seconds = time.perf_counter() - started
    print(plan.report())
    print(f"{args.workload}: planned in {seconds:.0f} s")
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(__file__).resolve().parent / "results" / f"plan-{args.workload}-{gpu}-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps({"workload": args.workload, "model": name, "qlora": qlora,
                               "memory_cap_gib": args.memory_cap_gb, "seconds": seconds,
                               "torch": torch.__version__, **dataclasses.asdict(plan)}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
