"""The one training loop of mpo: the SFT, reward-model and DPO stages all run through `train()`.

nanoGPT's train.py turned into a function. A stage hands it a model, a `loss_fn(model, batch) ->
(loss, metrics)`, lists of encoded rows and a `collate(rows) -> batch dict`; `train` does the rest:
AdamW with weight decay on matrices only, linear warm-up then cosine or linear decay, gradient
accumulation, clipping at 1.0, bf16 autocast on CUDA (fp32 on CPU unless --dtype bf16), evaluation
every `eval_every` steps and a log line every `log_every`.

    from train import TrainConfig, train
    metrics = train(model, loss_fn, rows, eval_rows, TrainConfig(), "out/sft", "sft", collate)

Left to the lab: the stage's bookkeeping (lab/stage.py: the rows' order, reshuffled each epoch;
resume, bit-identical on CPU; checkpoints, log lines, progress, the NaN stop), the device,
autocast and DDP under torchrun (lab/devices.py). Tests: python -m pytest -q tests/test_train.py
"""
import math
from dataclasses import dataclass

import torch

from lab.devices import (autocast, data_parallel, micro_batches_per_rank, pick_device, seed_all,
                         shard, sum_over_ranks, sync_gradients, to_device)
from lab.progress import progress
from lab.stage import Batches, StageRun


@dataclass
class TrainConfig:
    lr: float = 1e-5          # peak learning rate
    batch_size: int = 8       # rows per micro-batch (for DPO and the RM a row is a pair)
    grad_accum: int = 4       # micro-batches per optimizer step (effective batch: the product)
    epochs: float = 1.0       # passes over the training rows, used when max_steps is 0
    max_steps: int = 0        # optimizer steps; 0 = derive from epochs
    warmup_steps: int = 0     # linear warm-up to lr over this many steps
    decay: str = "cosine"     # "cosine" or "linear" decay to 0 after the warm-up, or "constant"
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on >= 2-D parameters only
    grad_clip: float = 1.0    # clip the global gradient norm to this
    eval_every: int = 100     # steps between evaluations, also at step 0 and the end (0: end)
    log_every: int = 10       # steps between train log lines
    ckpt_every: int = 500     # steps between checkpoints (there is always one at the end)
    seed: int = 0
    device: str = "auto"      # "auto" = cuda when available, else cpu
    dtype: str = "auto"       # autocast: "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16"
    compile: bool = False     # torch.compile the model for the forward passes


def optimizer_steps(cfg: TrainConfig, rows: int) -> int:
    """The optimizer steps train() takes on `rows` training rows: cfg.max_steps, else cfg.epochs
    passes of whole micro-batches (lab.stage.Batches), grad_accum to a step."""
    micro_batches = rows // max(1, min(cfg.batch_size, rows))
    return cfg.max_steps or max(1, int(cfg.epochs * micro_batches) // cfg.grad_accum)


def lr_at(step: int, cfg, total_steps: int, lr: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up over cfg.warmup_steps, then
    cfg.decay ("cosine" or "linear" to 0, or "constant") from the peak `lr` (default cfg.lr)."""
    lr = cfg.lr if lr is None else lr
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.decay == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.decay == "linear":
        return lr * (1.0 - progress)
    if cfg.decay == "constant":
        return lr
    raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {cfg.decay!r}")


def adamw(model, cfg: TrainConfig, device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with betas (0.9, 0.95); weight decay only on >= 2-D tensors
    (matmuls, embeddings), never on biases or LayerNorm gains (nanoGPT's configure_optimizers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one pass over each parameter, not a dozen elementwise ones (CPU: 5x faster steps
    # for bench.py's model, whose 50k-row embedding dominates)
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


@torch.no_grad()
def eval_loss(model, loss_fn, rows, collate, cfg: TrainConfig, name: str = "eval") -> dict:
    """Mean of loss_fn's loss and metrics over all rows, in batches of cfg.batch_size (under
    torchrun, each rank's shard)."""
    batch_size, device = cfg.batch_size, pick_device(cfg.device)
    model.eval()
    sums = {}
    mine = shard(rows)
    for i in progress(range(0, len(mine), batch_size), name):
        chunk = mine[i:i + batch_size]
        with autocast(device, cfg.dtype):
            loss, metrics = loss_fn(model, to_device(collate(chunk), device))
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
    model.train()
    return {k: v / len(rows) for k, v in sum_over_ranks(sums).items()}


def train(model, loss_fn, train_data, eval_data, cfg: TrainConfig, out_dir, stage: str, collate,
          key_metric: str = "loss") -> dict:
    """Train `model` in place; return the last logged metrics as {"train/<name>": x, "eval/<name>":
    y}. `key_metric` is the metric the progress line shows beside the loss."""
    device = pick_device(cfg.device)
    accum = micro_batches_per_rank(cfg.grad_accum, stage)  # grad_accum / torchrun's processes
    model.to(device)
    optimizer = adamw(model, cfg, device)
    batches = Batches(train_data, cfg.batch_size, cfg.seed)
    total = optimizer_steps(cfg, len(train_data))
    seed_all(cfg.seed)
    run = StageRun(out_dir, stage, total)
    step, _ = run.resume(model=model, optimizer=optimizer, data=batches)
    if run.finished:
        return run.result
    fwd = torch.compile(model) if cfg.compile else model
    ddp = data_parallel(fwd, device)  # under torchrun: gradients averaged in backward
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if step == 0 and eval_data and cfg.eval_every:
        run.log_eval(step, eval_loss(fwd, loss_fn, eval_data, collate, cfg, f"{stage} eval"))
    run.start_clock(step)
    while step < total:
        lr = lr_at(step, cfg, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics, tokens = {}, 0
        for micro in range(accum):
            sync_gradients(ddp, micro == accum - 1)
            batch = collate(next(batches))
            if "lengths" in batch:  # token rows, counted on the CPU: the stage's compute
                tokens += int(batch["lengths"].sum())
            with autocast(device, cfg.dtype):
                loss, extra = loss_fn(ddp, to_device(batch, device))
            run.stop_if_not_finite(step, {"loss": loss.item()})
            (loss / accum).backward()  # mean over the effective batch (DDP averages over the ranks)
            for k, v in {"loss": loss.detach(), **extra}.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        run.stop_if_not_finite(step, {"gradient norm": grad_norm.item()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        run.count(steps=1, tokens=tokens)
        if step % cfg.log_every == 0 or step == total:
            run.log_train(step, metrics | {"lr": lr, "grad_norm": float(grad_norm)}, key_metric)
        if eval_data and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
            run.log_eval(step, eval_loss(fwd, loss_fn, eval_data, collate, cfg, f"{stage} eval"))
        if step % cfg.ckpt_every == 0 and step < total:
            run.save(step, rng=True, model=model, optimizer=optimizer, data=batches)
    return run.finish(step, {"model": model.state_dict()})
