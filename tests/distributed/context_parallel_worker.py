"""One rank of tests/distributed/test_context_parallel.py (torchrun, gloo on CPU).

A patched tiny model with LoRA runs one packed batch whole (no context parallelism) and then sharded
over the ranks (shard_batch + context_parallel); the sharded losses and LoRA gradients, summed over
the ranks, must equal the whole batch's. Rank 0 writes both to OUT.

    torchrun --nproc-per-node 2 tests/distributed/context_parallel_worker.py FAMILY KV_HEADS SEED OUT [--padded]
"""
import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import fusetune  # noqa: E402
from fusetune.training.context_parallel import context_parallel, shard_batch  # noqa: E402
from fusetune.training.packing import pack_examples  # noqa: E402
from tests.tiny_models import add_lora, tiny_model  # noqa: E402


def lora_grads(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = None
    return grads


def main():
    family, kv_heads, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group("gloo")
    model = fusetune.patch_model(add_lora(tiny_model(family, num_key_value_heads=kv_heads), family))
    gen = torch.Generator().manual_seed(seed)  # the same batch on every rank
    lengths = torch.randint(1, 14, (5,), generator=gen).tolist()
    lengths[-1] += sum(lengths) % 2 == 0  # a length the ranks do not divide: shard_batch pads
    rows = [torch.randint(2, 257, (n,), generator=gen) for n in lengths]
    if "--padded" in sys.argv:  # rows right-padded to the longest (odd): a padding mask, on some shards only
        width = max(lengths) + (max(lengths) % 2 == 0)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}
    else:
        batch = pack_examples([{"input_ids": row.tolist()} for row in rows])

    whole = model(**batch, use_cache=False).loss
    whole.backward()
    expected = lora_grads(model)

    with context_parallel(model) if "--off" not in sys.argv else contextlib.nullcontext():
        shard = shard_batch(batch)
        loss = model(**shard, use_cache=False).loss
        loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = lora_grads(model)
    for g in grads.values():
        dist.all_reduce(g)
    if dist.get_rank() == 0:
        torch.save({"expected": (whole.detach(), expected), "sharded": (total, grads),
                    "tokens": batch["input_ids"].shape[1], "shard": shard["input_ids"].shape[1]}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
