"""Several processes for `fusetune train --nproc N`, on torch.distributed.

torchrun starts N copies of the command; each trains on its share of every effective batch
(examples rank, rank + N, ...), every loss term divided by the label count of the whole effective
batch, and the trainable gradients are summed across the processes once per step (one all_reduce
each), so the update is the one a single process computes on the whole batch. Summing once per
step, rather than per backward as DistributedDataParallel does, lets the processes run different
numbers of micro-batches (packing makes them differ) and any checkpointing. Only rank 0 writes
(checkpoints, adapter, summary, logs); every rank reads the same checkpoint to resume; the eval
loss is split over the processes like training.

training.fsdp shards the model instead (shard_model: FSDP2), and FSDP sums the gradients in every
backward; every process then takes part in every forward (evaluation, answers, saving: gathered).
training.context_parallel (fusetune.training.context_parallel) splits each micro-batch's tokens.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's part of a list the processes split (every world-th item from rank)."""
        return items[self.rank::self.world]


def launched_ranks() -> Ranks:
    """The ranks torchrun's environment gives this process (one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(ranks: Ranks) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns this process's device."""
    cuda = torch.cuda.is_available()
    if ranks.world == 1:
        return torch.device("cuda" if cuda else "cpu")
    if cuda:
        if ranks.local >= torch.cuda.device_count():
            raise RuntimeError(f"process {ranks.rank} wants GPU {ranks.local}, but {torch.cuda.device_count()} are "
                               f"visible: run at most that many processes (--nproc)")
        torch.cuda.set_device(ranks.local)
    device = torch.device("cuda", ranks.local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if not dist.is_backend_available(backend):
            raise RuntimeError(f"torch.distributed has no {backend} backend in this build of torch: install a "
                               f"torch with {backend}, or train with one process")
        # rank 0 alone evaluates, generates and writes checkpoints while the others wait in a collective:
        # NCCL's default 10 minutes could cut a long eval or a big save short
        dist.init_process_group(backend, device_id=device if cuda else None, timeout=datetime.timedelta(hours=2))
    return device


def finish(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        # the finished model's pending collectives (FSDP's async gathers) freed now: freed at the
        # interpreter's exit, gloo's threads can abort the process ("terminate called ...")
        gc.collect()
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def from_main(ranks: Ranks, value):
    """Rank 0's value (any picklable object) on every process."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(ranks: Ranks, value: float, device) -> float:
    """The sum of a number over the processes."""
    if ranks.world == 1:
        return value
    total = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total)


def any_rank(ranks: Ranks, flag: bool, device) -> bool:
    """True on every process if it is true on any (a stop request one process received)."""
    return all_sum(ranks, float(flag), device) > 0


def sum_gradients(ranks: Ranks, params: list[torch.Tensor]) -> None:
    """Add up the gradients of params across the processes, in place. A parameter no process has
    a gradient for keeps none (AdamW skips it, as with one process); one that only some have counts
    as zeros on the others."""
    if ranks.world == 1 or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    for p, anyone in zip(params, has.tolist()):
        if not anyone:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def all_max(ranks: Ranks, value: int, device) -> int:
    """The largest of a number over the processes."""
    if ranks.world == 1:
        return value
    top = torch.tensor(int(value), dtype=torch.int64, device=device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top)


def quantised_parameters(model) -> set[torch.nn.Parameter]:
    """The bitsandbytes-quantised weights of a 4-bit base (Params4bit)."""
    return {p for p in model.parameters() if type(p).__name__ == "Params4bit"}


def shard_model(model) -> tuple[int, int]:
    """FSDP2: every decoder layer (the classes the model names in _no_split_modules) and then the
    whole model become fully_shard units over all processes, so each holds 1/N of the weights,
    gradients and optimizer states and gathers a layer's weights only while it runs. Gradients are
    summed over the processes, not averaged: every loss here is already divided by the whole
    batch's label count.

    A 4-bit base's NF4 weights stay whole on every process (fully_shard's ignored_params): FSDP2
    shards a parameter by turning it into a DTensor, which drops bitsandbytes' Params4bit subclass
    and the quantisation state it carries (the absmax, the code book), so a sharded NF4 weight no
    longer dequantises. They are frozen and a quarter of their 16-bit size; the adapters, their
    gradients and AdamW states, and the 16-bit weights (embeddings, norms, lm_head) are sharded.
    Returns (decoder layers sharded, quantised weights kept whole)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    from fusetune.patching import hf_model

    names = set(getattr(hf_model(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ValueError(f"training.fsdp shards a model by its decoder layers, and {type(hf_model(model)).__name__} "
                         f"names none (_no_split_modules): train it without fsdp")
    whole = quantised_parameters(model)
    for layer in layers:
        fully_shard(layer, ignored_params=whole or None)
    fully_shard(model, ignored_params=whole or None)
    if hasattr(model, "generate"):  # generate calls the inner model, not this one's forward: gather around it too
        register_fsdp_forward_method(model, "generate")
    # transformers' generate keeps stepping (synced_gpus) until every process is done when it sees this:
    # a process whose reply ends sooner would otherwise leave the others waiting in a gather
    hf_model(model)._is_fsdp_managed_module = True
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # a plain sum: gloo has no pre-multiplied one
                module.set_force_sum_reduction_for_comms(True)
    return len(layers), len(whole)


def is_sharded(model) -> bool:
    if not dist.is_available():  # (a torch built without distributed support)
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole on every process (a collective: every process calls
    it in the same order); any other tensor as it is."""
    if not dist.is_available():
        return t
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` (the same on every process) laid out as the DTensor `like`; any other `like`: whole."""
    if not dist.is_available():
        return whole
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return whole
    # every process holds `whole`: each keeps its own piece, nothing is sent
    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def reshard(model) -> None:
    """Every FSDP unit back on its sharded parameters. A forward leaves the root unit gathered (FSDP2
    does not reshard the root after its forward), and its modules then hold whole tensors in place of
    the sharded DTensors: an optimizer built on those would step tensors FSDP never writes gradients to.
    Without FSDP: nothing happens."""
    if not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


@contextlib.contextmanager
def gathered(model):
    """Every FSDP unit's weights whole on every process inside the block (as plain tensors on the
    modules; state_dict() still gives shards), for reading them: saving, merging. The whole model
    must fit in one process's memory then. Without FSDP: nothing happens."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.unshard()
    try:
        yield model
    finally:
        reshard(model)
