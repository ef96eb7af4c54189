"""Where the tensors run: the device, bf16 autocast, and the ranks of torchrun.

Data parallelism under torchrun (`torchrun --nproc_per_node=N mpo.py ...`) is the only code that
knows about ranks. Without torchrun (WORLD_SIZE unset) rank is 0, world size 1 and every helper is a
no-op. The learner's files call these through a few names: pick_device, autocast, shard / unshard,
sum_over_ranks, mean_over_ranks.
"""
import atexit
import builtins
import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lab.progress import progress


def pick_device(name: str = "auto") -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (torch.cuda.is_available() is "
                         "False)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Autocast dtype per device type for each --dtype. bf16 has fp32's exponent range, so no loss
# scaling is needed; weights, gradients and AdamW moments stay fp32 either way. "bf16" autocasts on
# CPU too: CPUs with AMX (Intel Sapphire Rapids and later) run bf16 matmuls ~6x faster than fp32.
AUTOCAST_DTYPES = {"auto": {"cuda": torch.bfloat16}, "fp32": {},
                   "bf16": {"cuda": torch.bfloat16, "cpu": torch.bfloat16}}


def autocast_dtype(device, dtype: str) -> torch.dtype | None:
    """The dtype that --dtype `dtype` autocasts to on this device; None: plain fp32."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"--dtype {dtype}: choose {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[dtype].get(torch.device(device).type)


def autocast(device, dtype: str):
    """bf16 autocast where --dtype `dtype` asks for it on this device type; fp32 elsewhere."""
    to = autocast_dtype(device, dtype)
    if to is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=to)


def setup_distributed() -> int:
    """Join torchrun's process group (nccl on CUDA, one GPU per rank; gloo on CPU) and silence
    print() on ranks > 0. Returns the world size; 1 without torchrun."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this rank's GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(dist.destroy_process_group)
    if not is_main():
        builtins.print = lambda *args, **kwargs: None  # progress and reports from rank 0 only
    return world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """x averaged over the ranks, in place (gradients, token counts)."""
    if world_size() > 1:
        dist.all_reduce(x)
        x /= world_size()
    return x


def gather(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...]: any picklable object."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: list) -> list:
    """This rank's contiguous slice of items, for work split over the ranks (evaluation,
    sampling)."""
    return items[rank() * len(items) // world_size():(rank() + 1) * len(items) // world_size()]


def unshard(part: list) -> list:
    """The inverse of shard: every rank's part, concatenated in rank order, on every rank."""
    return [x for p in gather(part) for x in p]


def sum_over_ranks(sums: dict) -> dict:
    """Every rank's sums (floats; a rank with an empty shard may lack keys), added up."""
    parts = gather(sums)
    keys = dict.fromkeys(k for p in parts for k in p)
    return {k: sum(p.get(k, 0.0) for p in parts) for k in keys}


def mean_over_ranks(metrics: dict) -> dict:
    """Every rank's metrics (floats, same keys), averaged: logs describe the whole batch."""
    parts = gather(metrics)
    return {k: sum(p[k] for p in parts) / len(parts) for k in metrics}


def seed_all(seed: int):
    """Seed torch, numpy and random: each rank its own stream (dropout)."""
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(seed + rank() * 100003)


def micro_batches_per_rank(grad_accum: int, stage: str) -> int:
    """This rank's micro-batches per optimizer step: the ranks share a step's grad_accum, so the
    effective batch (batch_size x grad_accum) does not depend on the number of processes."""
    world = world_size()
    if grad_accum % world:
        raise ValueError(f"{stage}: --{stage}.grad_accum {grad_accum} is not a multiple of the "
                         f"{world} processes (each takes grad_accum / processes micro-batches of a "
                         "step: same effective batch)")
    return grad_accum // world


def data_parallel(model, device):
    """Under torchrun, `model` in DDP: it all-reduces (averages) the gradients during backward,
    overlapped with it. Else the model itself."""
    if world_size() == 1:
        return model
    return DDP(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


def sync_gradients(model, now: bool):
    """DDP all-reduces only in the backward of a step's last micro-batch (nanoGPT's no_sync)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = now


def average_gradients(model):
    """Every rank's gradients averaged, for a loop that steps without DDP (PPO): every rank then
    steps with the mean gradient."""
    if world_size() > 1:
        for p in model.parameters():
            p.grad = all_reduce_mean(p.grad if p.grad is not None else torch.zeros_like(p))


def to_device(batch: dict, device) -> dict:
    """Move the tensors of a collated batch to `device`."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


@torch.no_grad()
def map_batches(fn, model, rows, collate, batch_size, device, dtype, name="scoring") -> list:
    """fn(model, batch) over encoded rows, batch by batch, in eval mode: one CPU tensor per batch.
    Under torchrun each rank takes a shard of the rows and every rank gets all the outputs, in
    order. `name` labels the progress lines of a long pass."""
    model.to(device).eval()
    outputs, mine = [], shard(rows)
    for i in progress(range(0, len(mine), batch_size), name):
        batch = to_device(collate(mine[i:i + batch_size]), device)
        with autocast(device, dtype):
            outputs.append(fn(model, batch).float().cpu())
    return unshard(outputs)


def masked_mean(x, mask):
    """Mean over the real tokens of the whole batch: under torchrun every rank's rows (sum and count
    all-reduced), so the whitening statistics do not depend on how the batch is split across
    ranks."""
    total = all_reduce_mean(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]))
    return total[0] / total[1].clamp(min=1)


def masked_var(x, mask):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)
