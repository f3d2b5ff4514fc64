"""One rank of tests/distributed/test_data_parallel.py (run with torchrun, gloo on CPU; or alone).

A patched tiny Llama with LoRA trains 3 SGD steps on packed rows (SGD: Adam would magnify the last-bit
differences of gradients summed in another order); each step's 8 examples are split
across the ranks, the loss normalised by the global label count (num_items_in_batch) and scaled by the
world size, because DDP and FSDP2 average gradients over ranks. Rank 0 writes the loss curve and the
trainable weights (gathered in full under FSDP2) to OUT.

    torchrun --nproc-per-node 2 tests/distributed/worker.py ddp|fsdp|one OUT
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import fusetune  # noqa: E402
from fusetune.training.packing import pack_examples  # noqa: E402
from tests.tiny_models import add_lora, tiny_model  # noqa: E402

STEPS, EXAMPLES = 3, 8


def step_examples(step: int) -> list[dict]:
    gen = torch.Generator().manual_seed(step)
    lengths = torch.randint(3, 20, (EXAMPLES,), generator=gen).tolist()
    return [{"input_ids": torch.randint(2, 257, (n,), generator=gen).tolist()} for n in lengths]


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = fusetune.patch_model(add_lora(tiny_model("llama"), "llama"))
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for step in range(STEPS):
        rows = step_examples(step)
        items = sum(len(r["input_ids"]) - 1 for r in rows)
        loss = model(**pack_examples(rows[rank::world]), num_items_in_batch=items, use_cache=False).loss
        (loss * world).backward()  # the ranks' gradients are averaged: scale back to the global sum
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item())
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = (model.module if mode == "ddp" else model).state_dict()
    if rank == 0:
        lora = {k.removeprefix("module."): v for k, v in state.items() if "lora_" in k}
        torch.save({"losses": losses, "lora": lora}, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
