"""The one training loop of mpo: the SFT, reward-model and DPO stages all run through `train()`;
its bookkeeping (resume, checkpoints, log lines, progress, the NaN stop) is `StageRun`, which PPO's
own loop (ppo.py) shares.

nanoGPT's train.py turned into a function. A stage hands it a model, a `loss_fn(model, batch) ->
(loss, metrics)`, lists of encoded rows and a `collate(rows) -> batch dict`; `train` does the rest:
AdamW with weight decay on matrices only, linear warm-up then cosine or linear decay, gradient
accumulation, clipping at 1.0, bf16 autocast on CUDA (fp32 on CPU unless --dtype bf16), evaluation
every `eval_every` steps, a progress line, one JSON line per logged step in `out_dir/metrics.jsonl`,
and crash-safe checkpoints. Calling `train` again with the same out_dir resumes from the last
checkpoint (on CPU bit-identical to a run that never stopped); once a stage has finished, calling it
again only loads the final weights. Under torchrun the same loop runs data-parallel with DDP: the
ranks share the grad_accum micro-batches of each step, so the effective batch (batch_size x
grad_accum) does not depend on the number of processes.

    from train import TrainConfig, train
    metrics = train(model, loss_fn, rows, eval_rows, TrainConfig(lr=1e-4), "out/sft", "sft",
                    collate)
"""
import atexit
import builtins
import contextlib
import datetime
import json
import math
import os
import pickle
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import atomic_write, regular_file


@dataclass
class TrainConfig:
    lr: float = 1e-5          # peak learning rate
    batch_size: int = 8       # rows per micro-batch (for DPO and the RM a row is a pair)
    grad_accum: int = 4       # micro-batches per optimizer step: effective batch = batch_size x
                              # grad_accum
    epochs: float = 1.0       # passes over the training rows, used when max_steps is 0
    max_steps: int = 0        # optimizer steps; 0 = derive from epochs
    warmup_steps: int = 0     # linear warm-up to lr over this many steps
    decay: str = "cosine"     # "cosine" or "linear" decay to 0 after the warm-up, or "constant"
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on >= 2-D parameters only
    grad_clip: float = 1.0    # clip the global gradient norm to this
    eval_every: int = 100     # steps between evaluations (also at step 0 and at the end); 0 = end
                              # only
    log_every: int = 10       # steps between train log lines
    ckpt_every: int = 500     # steps between checkpoints (there is always one at the end)
    seed: int = 0
    device: str = "auto"      # "auto" = cuda when available, else cpu
    dtype: str = "auto"       # autocast: "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16"
    compile: bool = False     # torch.compile the model for the forward passes


# Data parallelism under torchrun (`torchrun --nproc_per_node=N mpo.py ...`): the only code that
# knows about ranks. Without torchrun (WORLD_SIZE unset) rank is 0, world size 1 and every helper is
# a no-op.

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


def memory_estimate(config, rows, seq_len, head_positions, trained=1, frozen=0, bf16=False) -> dict:
    """Rough peak bytes of one training micro-batch of `rows` sequences: fp32 weights, gradients and
    AdamW moments (16 bytes per parameter) of the `trained` models, fp32 weights of the `frozen`
    ones, the activations autograd keeps (about 34 bytes per token per unit of width per layer in
    16-bit with flash attention, Korthikanti et al. 2022, table 2; twice that in fp32; with
    activation checkpointing only each block's input plus one block being recomputed) and three fp32
    buffers of logits (the logits, the log-softmax or logsumexp pass, the gradient; measured on CPU
    for SFT, DPO and PPO with the system allocator, MPO_MALLOPT=0) on the `head_positions` of each
    row."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    params = V * C + config.block_size * C + L * (12 * C * C + 13 * C) + 2 * C
    elem = 2 if bf16 else 4
    per_layer = 17 * elem * rows * seq_len * C  # 34 bytes in 16-bit = 17 elements per token per C
    kept = L * elem * rows * seq_len * C + per_layer if config.grad_checkpoint else L * per_layer
    parts = {"weights": (16 * trained + 4 * frozen) * params, "activations": kept,
             "logits": 3 * 4 * rows * head_positions * V}
    return {**parts, "total": sum(parts.values())}


def sampling_batch(config, seq_len, device, cpu_rows=32, most=512) -> int:
    """Rows per sampling / scoring batch (--split.batch_size 0, --eval.batch_size 0): cpu_rows on a
    CPU; on a GPU as many as half its free memory holds, counting per row the KV cache of every
    layer in 16-bit and three fp32 rows of logits for each position (scoring a whole response), at
    most `most`: a batch of 32 leaves an 80 GB card nearly idle."""
    if torch.device(device).type != "cuda":
        return cpu_rows
    free, _ = torch.cuda.mem_get_info()
    per_row = 2 * config.n_layer * seq_len * config.n_embd * 2 + 3 * seq_len * config.vocab_size * 4
    return max(1, min(most, free // 2 // per_row))


def time_probe(model, rows: int, seq_len: int, sample_rows: tuple, device, dtype: str) -> dict:
    """Seconds of one forward + backward of `rows` random sequences of seq_len tokens
    ("train_step"), and of one decoding step for each number of rows in `sample_rows` (a 9-token
    generate after a seq_len / 2 prompt, less a 1-token one), each the second of two timed calls:
    what the plan at the start of a run multiplies. The weights, their device, the mode and the
    global random state stay as they were."""
    g = torch.Generator().manual_seed(0)
    home, mode = next(model.parameters()).device, model.training
    model.to(device).train()

    def ids(n, t):
        return torch.randint(model.config.vocab_size, (n, t), generator=g).to(device)

    def timed(fn):
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start

    def step():
        with autocast(device, dtype):
            model(ids(rows, seq_len)).float().mean().backward()
        model.zero_grad(set_to_none=True)

    def decode_step(n):
        prompts = ids(n, max(1, seq_len // 2))
        with autocast(device, dtype):
            one, nine = (timed(lambda k=k: model.generate(prompts, k,
                                                          generator=torch.Generator(device)))
                         for k in (1, 9))
        return max(nine - one, 1e-9) / 8

    times = {"train_step": timed(step), **{f"decode_step_{n}": decode_step(n) for n in sample_rows}}
    model.to(home).train(mode)
    return times


def atomic_save(obj, path):
    """model.atomic_write of torch.save(obj), or of obj itself when it is bytes: a crash mid-write
    never leaves a torn file behind. Under torchrun only rank 0 writes: every rank holds the same
    weights and results."""
    if is_main():
        atomic_write(path, lambda f: f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f))


def rate_eta(done: int, total: int, seconds: float) -> str:
    """"3.21 it/s | ETA 0:01:05": the rate so far and the time left at that rate; "s/it" when an
    iteration takes more than a second (a GPT-2 step on a CPU), so that the rate never reads
    0.00."""
    rate = done / max(seconds, 1e-9)
    speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/it"
    return f"{speed} | ETA {datetime.timedelta(seconds=round((total - done) / max(rate, 1e-9)))}"


def progress(items, name: str, every: float = 10.0):
    """Yield the items of a sequence; a phase that takes more than `every` seconds prints
    `name i/n | rate | ETA` every `every` seconds and once at its end: no long phase is silent."""
    start = last = time.time()
    for i, item in enumerate(items, 1):
        yield item
        now = time.time()
        if now - last >= every or (i == len(items) and now - start >= every):
            last = now
            print(f"{name} {i}/{len(items)} | {rate_eta(i, len(items), now - start)}", flush=True)


def timestamp() -> str:
    """The time of a metrics.jsonl line, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def optimizer_steps(cfg: TrainConfig, rows: int) -> int:
    """The optimizer steps train() takes on `rows` training rows: cfg.max_steps, else cfg.epochs
    passes of whole micro-batches (Batches), grad_accum to a step."""
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
    """AdamW with betas (0.9, 0.95); weight decay only on >= 2-D tensors (matmuls, embeddings),
    never on biases, LayerNorm gains or the reward offset (nanoGPT's configure_optimizers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one pass over each parameter instead of a dozen elementwise ones; on CPU (torch >= 2.4)
    # it made the step 5x faster for bench.py's default model, whose 50k-row embedding dominates
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


class Batches:
    """Endless micro-batches of rows, reshuffled each epoch by a generator seeded with seed + epoch,
    so the position (epoch, index into that epoch's order) is all a checkpoint needs to resume
    mid-epoch. The ragged tail of an epoch is dropped: every micro-batch has batch_size rows. Under
    torchrun the ranks deal out one stream of micro-batches (rank r takes every world-th, like
    DistributedSampler): N processes see the micro-batches that one process would see, N at a
    time."""

    def __init__(self, rows, batch_size: int, seed: int):
        if not rows:
            raise ValueError("no training rows")
        batch_size = min(batch_size, len(rows))  # a set smaller than a batch is one batch
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.per_epoch = len(rows) // batch_size
        self.epoch, self.index, self._order = 0, 0, None

    def __next__(self):
        return [self._next() for _ in range(world_size())][rank()]

    def _next(self):
        if self.index + self.batch_size > len(self.rows):
            self.epoch, self.index = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.rows), generator=g).tolist())
        picked = self._order[1][self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return [self.rows[i] for i in picked]


def to_device(batch: dict, device) -> dict:
    """Move the tensors of a collated batch to `device`."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


@torch.no_grad()
def eval_loss(model, loss_fn, rows, collate, cfg: TrainConfig, name: str = "eval") -> dict:
    """Mean of loss_fn's loss and metrics over all rows, in batches of cfg.batch_size, weighted by
    rows per batch. Under torchrun each rank evaluates its shard of the rows and the sums are
    gathered."""
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


def _rng_state() -> dict:
    """Every RNG's state as tensors, ints and lists: what torch.load(weights_only=True) reads
    back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path, mmap=False) -> dict:
    """torch.load(path) with weights_only=True: tensors, numbers, strings and containers only, so a
    planted pickle never runs code. A file that needs pickle, a truncated or corrupt one, or one
    that holds no dict, is a one-line ValueError naming it."""
    path = regular_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # weights_only refused a global: loading would run code
        why = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it calls {why[1]}" if why else "it needs pickle"
        raise ValueError(f"{path}: not a weights-only checkpoint ({why}); refused: loading it "
                         "could run code") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        why = " ".join(str(e).split(". This is an internal")[0].split())[:120]
        raise ValueError(f"{path}: cannot read checkpoint, truncated or corrupt ({why})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint (a {type(state).__name__}, expected a dict)")
    return state


def check_shapes(model, state: dict, path):
    """A one-line error when the weights `state` read from `path` are another model's shape than
    `model` (a rerun into an --out made with other --n_layer / --n_embd / --init flags)."""
    ours = model.state_dict()
    if not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    diff = [f"{k} {'missing' if k in ours else 'unexpected'}"
            for k in sorted(set(ours) ^ set(state))]
    diff += [f"{k} is {tuple(v.shape)} there, {tuple(ours[k].shape)} in this run"
             for k, v in state.items() if k in ours and v.shape != ours[k].shape]
    if diff:
        raise ValueError(f"{path}: checkpoint of another model shape ({diff[0]}; {len(diff)} "
                         "mismatched tensors); rerun with the flags it was made with, or use "
                         "another --out")


def load_weights(model, state: dict, path):
    """model.load_state_dict(state) after check_shapes."""
    check_shapes(model, state, path)
    model.load_state_dict(state)


def _drop_log_lines_after(log_path: Path, stage: str, step: int):
    """Forget this stage's lines logged after `step`: the resumed run logs those steps again."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line can be torn by the crash that we resume from
            continue
        ours = isinstance(record, dict) and record.get("stage") == stage
        if not ours or record.get("step", -1) <= step:
            keep.append(line + "\n")
    atomic_save("".join(keep).encode(), log_path)


class StageRun:
    """What the loops of train() and ppo.ppo() share: resume from out_dir/<stage>_ckpt.pt, the
    checkpoints, the lines of metrics.jsonl and samples.jsonl, the progress line with its rate and
    ETA, and the stop on a value gone nan or inf. A loop counts `total` steps (PPO calls them
    iterations: `unit`, also the checkpoint's key for it). `result` holds the last logged metrics,
    {"train/<name>": x, "eval/<name>": y}, plus what the loop adds (compute/*); every checkpoint
    keeps it. On a terminal the train line is rewritten in place unless `rewrite` is off (PPO prints
    a line per iteration). This is the resume point inside a stage; runs.Stages, above it, skips a
    stage whose final.pt exists."""

    def __init__(self, out_dir, stage: str, total: int, unit: str = "step", rewrite: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stage, self.total, self.unit = stage, total, unit
        self.ckpt_path = self.out_dir / f"{stage}_ckpt.pt"
        self.result = {}
        self.finished = False  # resume() found the stage done: only its weights were loaded
        self.tty = sys.stdout.isatty() and rewrite
        self.line_open = False  # a progress line on the terminal waits for its newline
        self.clock = (0, time.time())

    def resume(self, **weights) -> tuple[int, dict | None]:
        """Load the checkpoint if there is one: its weights into each model of `weights` ({key in
        the checkpoint: model}), its step and result. Returns (step, checkpoint), or (0, None) for a
        fresh start. A finished stage sets self.finished: the caller returns. Else the log lines
        written after that step are forgotten: the resumed loop logs those steps again."""
        step, ckpt = 0, None
        if self.ckpt_path.exists():
            ckpt = load_checkpoint(self.ckpt_path)
            for key, model in weights.items():
                load_weights(model, ckpt[key], self.ckpt_path)
            step, self.result = ckpt[self.unit], ckpt["metrics"]
            if ckpt["done"]:
                print(f"{self.stage}: finished checkpoint {self.ckpt_path} found, weights loaded, "
                      "stage skipped")
                self.finished = True
                return step, ckpt
            where = f"{self.unit} {step}/{self.total}"
            print(f"{self.stage}: resuming from {self.ckpt_path} at {where}")
        for name in ("metrics.jsonl", "samples.jsonl"):
            _drop_log_lines_after(self.out_dir / name, self.stage, step if ckpt else -1)
        return step, ckpt

    def start_clock(self, step: int):
        """The progress line's rate counts the steps from here on (not the first evaluation)."""
        self.clock = (step, time.time())

    def status(self, step: int) -> str:
        """"sft 30/100 | 3.21 it/s | ETA 0:00:21": the start of a train log line."""
        start_step, start_time = self.clock
        speed = rate_eta(step - start_step, self.total - start_step, time.time() - start_time)
        return f"{self.stage} {step}/{self.total} | {speed}"

    def log(self, step: int, split: str, metrics: dict, line: str, samples=()):
        """Keep `metrics` in the result, append them to metrics.jsonl (and `samples`, dicts of a
        prompt and its response, to samples.jsonl), and print `line`."""
        self.result.update({f"{split}/{k}": v for k, v in metrics.items()})
        if is_main():
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                record = {"stage": self.stage, "step": step, "split": split, "time": timestamp()}
                f.write(json.dumps(record | metrics) + "\n")
            if samples:
                with open(self.out_dir / "samples.jsonl", "a") as f:
                    f.writelines(json.dumps({"stage": self.stage, "step": step, **s}) + "\n"
                                 for s in samples)
        # On a terminal the train line is rewritten in place (\r, then clear to the line's end).
        self.line_open = self.tty and split == "train"
        print("\r" + line + "\033[K" if self.tty else line, end="" if self.line_open else "\n",
              flush=True)

    def stop_if_not_finite(self, step: int, values: dict):
        """A one-line FloatingPointError when any of `values` ({name: float}) is nan or inf in step
        + 1 ("loss is nan"; of several, their names: "kl, score not finite"); the last checkpoint,
        from before, stays as it is."""
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            if len(values) == 1:
                what = f"{bad[0]} is {values[bad[0]]}"
            else:
                what = f"{', '.join(bad)} not finite"
            kept = self.ckpt_path if self.ckpt_path.exists() else "none yet"
            raise FloatingPointError(f"{self.stage}: {what} at {self.unit} {step + 1}; stopped, "
                                     f"last good checkpoint kept: {kept}")

    def count(self, **spent):
        """Add to the stage's compute in the result (compute/steps, /tokens, /samples: the study
        compares methods' budgets); a resumed stage counts on from its checkpoint's."""
        for k, v in spent.items():
            self.result[f"compute/{k}"] = self.result.get(f"compute/{k}", 0) + v

    def save(self, step: int, state: dict):
        """A checkpoint to resume from at `step`: `state` (weights, optimizers, data position)."""
        state = state | {self.unit: step, "metrics": self.result, "done": False}
        atomic_save(state, self.ckpt_path)

    def finish(self, step: int, weights: dict) -> dict:
        """The finished checkpoint, which keeps only the `weights` (an optimizer would triple the
        file); returns the result."""
        if self.line_open:
            print()
        atomic_save(weights | {self.unit: step, "metrics": self.result, "done": True},
                    self.ckpt_path)
        return self.result


def train(model, loss_fn, train_data, eval_data, cfg: TrainConfig, out_dir, stage: str, collate,
          key_metric: str = "loss") -> dict:
    """Train `model` in place; return the last logged metrics as {"train/<name>": x, "eval/<name>":
    y}. `key_metric` is the metric the progress line shows beside the loss."""
    device = pick_device(cfg.device)
    world = world_size()
    if cfg.grad_accum % world:
        raise ValueError(f"{stage}: --{stage}.grad_accum {cfg.grad_accum} is not a multiple of the "
                         f"{world} processes (each takes grad_accum / processes micro-batches of a "
                         "step: same effective batch)")
    accum = cfg.grad_accum // world  # this rank's micro-batches per optimizer step
    model.to(device)
    optimizer = adamw(model, cfg, device)
    batches = Batches(train_data, cfg.batch_size, cfg.seed)
    total = optimizer_steps(cfg, len(train_data))
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(cfg.seed + rank() * 100003)  # each rank its own random stream (dropout)
    stage_run = StageRun(out_dir, stage, total)
    step, ckpt = stage_run.resume(model=model)
    if stage_run.finished:
        return stage_run.result
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        batches.epoch, batches.index = ckpt["data"]
        _set_rng_state(ckpt["rng"][rank() % len(ckpt["rng"])])

    def run_eval():
        metrics = eval_loss(fwd, loss_fn, eval_data, collate, cfg, f"{stage} eval")
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        stage_run.log(step, "eval", metrics, f"{stage} eval step {step}: {shown}")

    fwd = torch.compile(model) if cfg.compile else model
    # DDP all-reduces (averages) the gradients during backward, overlapped with it; eval uses fwd.
    ddp = fwd
    if world > 1:
        ddp = DDP(fwd, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if step == 0 and eval_data and cfg.eval_every:
        run_eval()
    stage_run.start_clock(step)
    while step < total:
        lr = lr_at(step, cfg, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = {}
        tokens = 0
        for micro in range(accum):
            if ddp is not fwd:  # all-reduce in the step's last backward only (nanoGPT's no_sync)
                ddp.require_backward_grad_sync = micro == accum - 1
            batch = collate(next(batches))
            if "lengths" in batch:  # token rows; counted on the CPU
                tokens += int(batch["lengths"].sum())
            batch = to_device(batch, device)
            with autocast(device, cfg.dtype):
                loss, extra = loss_fn(ddp, batch)
            stage_run.stop_if_not_finite(step, {"loss": loss.item()})
            (loss / accum).backward()  # mean over the effective batch (DDP averages over the ranks)
            for k, v in {"loss": loss.detach(), **extra}.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        stage_run.stop_if_not_finite(step, {"gradient norm": grad_norm.item()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # The stage's compute: an optimizer step and the real (non-pad) tokens through forward +
        # backward, all ranks.
        stage_run.count(steps=1, tokens=int(sum_over_ranks({"t": tokens})["t"]))
        if step % cfg.log_every == 0 or step == total:
            metrics = mean_over_ranks(metrics)
            shown = f" | {key_metric} {metrics[key_metric]:.4f}" if key_metric != "loss" else ""
            line = f"{stage_run.status(step)} | loss {metrics['loss']:.4f}{shown}"
            stage_run.log(step, "train", {**metrics, "lr": lr, "grad_norm": float(grad_norm)}, line)
        if eval_data and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
            run_eval()
        if step % cfg.ckpt_every == 0 and step < total:
            # one RNG state per rank (gather: every rank takes part)
            stage_run.save(step, {"model": model.state_dict(),
                                  "optimizer": optimizer.state_dict(),
                                  "data": (batches.epoch, batches.index),
                                  "rng": gather(_rng_state())})
    return stage_run.finish(step, {"model": model.state_dict()})
