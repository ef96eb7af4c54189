"""A stage's bookkeeping, shared by the loops of train.train and ppo.ppo: the training rows' order
(Batches), resume from its checkpoint, the checkpoints, the lines of metrics.jsonl and
samples.jsonl, the progress line with its rate and ETA, the stop on a value gone nan or inf, and
the compute it spent."""
import json
import math
import sys
import time
from pathlib import Path

import torch

from lab.checkpoints import atomic_save, load_checkpoint, load_weights, rng_state, set_rng_state
from lab.devices import gather, is_main, mean_over_ranks, rank, sum_over_ranks, world_size
from lab.progress import rate_eta, timestamp


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
    a line per iteration). This is the resume point inside a stage; lab.runs.Stages, above it, skips
    a stage whose final.pt exists."""

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

    def resume(self, **objects) -> tuple[int, dict | None]:
        """Load the checkpoint if there is one into `objects` ({key in the checkpoint: a model, an
        optimizer, or the train loop's Batches}), with its step, its result and (when it kept one)
        every RNG's state. Returns (step, checkpoint), or (0, None) for a fresh start. A finished
        stage keeps only its weights: they are loaded and self.finished is set, the caller returns.
        Else the log lines written after that step are forgotten: the resumed loop logs those steps
        again."""
        step, ckpt = 0, None
        if self.ckpt_path.exists():
            ckpt = load_checkpoint(self.ckpt_path)
            for key, obj in objects.items():
                if isinstance(obj, torch.nn.Module) and key in ckpt:
                    load_weights(obj, ckpt[key], self.ckpt_path)
            step, self.result = ckpt[self.unit], ckpt["metrics"]
            if ckpt["done"]:
                print(f"{self.stage}: finished checkpoint {self.ckpt_path} found, weights loaded, "
                      "stage skipped")
                self.finished = True
                return step, ckpt
            for key, obj in objects.items():
                if isinstance(obj, torch.optim.Optimizer):
                    obj.load_state_dict(ckpt[key])
                elif hasattr(obj, "epoch"):  # Batches: the position in the data
                    obj.epoch, obj.index = ckpt[key]
            if "rng" in ckpt:  # one state per rank
                set_rng_state(ckpt["rng"][rank() % len(ckpt["rng"])])
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

    def count(self, steps: int, **per_rank):
        """Add to the stage's compute in the result (compute/steps, /tokens, /samples: the study
        compares methods' budgets): optimizer `steps`, and each of `per_rank` summed over the ranks
        of torchrun. A resumed stage counts on from its checkpoint's."""
        spent = {"steps": steps, **{k: int(v) for k, v in sum_over_ranks(per_rank).items()}}
        for k, v in spent.items():
            self.result[f"compute/{k}"] = self.result.get(f"compute/{k}", 0) + v

    def log_train(self, step: int, metrics: dict, key_metric: str = "loss"):
        """The train line of train(): `metrics` averaged over the ranks, shown with the loss and
        `key_metric`."""
        metrics = mean_over_ranks(metrics)
        shown = f" | {key_metric} {metrics[key_metric]:.4f}" if key_metric != "loss" else ""
        self.log(step, "train", metrics, f"{self.status(step)} | loss {metrics['loss']:.4f}{shown}")

    def log_iteration(self, step: int, stats: dict, pairs, scores):
        """PPO's line per iteration: its statistics, and the first decoded (prompt, response)
        `pairs` with their RM `scores` to samples.jsonl."""
        samples = [{"prompt": p, "response": r, "score": float(s)}
                   for (p, r), s in zip(pairs, scores)]
        gold = f" | gold {stats['gold']:.3f}" if "gold" in stats else ""
        line = (f"{self.status(step)} | score {stats['score']:.3f}{gold}"
                f" | kl {stats['kl']:.3f} | len {stats['response_len']:.1f}"
                f" | eos {stats['eos_frac']:.2f} | clipfrac {stats['clipfrac']:.3f}"
                f" | rollout {stats['rollout_s']:.2f}s update {stats['update_s']:.2f}s")
        self.log(step, "train", stats, line, samples)

    def log_eval(self, step: int, metrics: dict, digits: int = 4):
        """An evaluation's line: every metric to `digits` decimals."""
        shown = " ".join(f"{k} {v:.{digits}f}" for k, v in metrics.items())
        self.log(step, "eval", metrics, f"{self.stage} eval {self.unit} {step}: {shown}")

    def save(self, step: int, rng: bool = False, **objects):
        """A checkpoint to resume from at `step`: the state of each of `objects` (models,
        optimizers, the Batches' position, plain values) and, with `rng`, every RNG's state on each
        rank (gather: every rank takes part)."""
        state = {k: v.state_dict() if hasattr(v, "state_dict") else
                 (v.epoch, v.index) if hasattr(v, "epoch") else v for k, v in objects.items()}
        if rng:
            state["rng"] = gather(rng_state())
        atomic_save(state | {self.unit: step, "metrics": self.result, "done": False},
                    self.ckpt_path)

    def finish(self, step: int, weights: dict) -> dict:
        """The finished checkpoint, which keeps only the `weights` (an optimizer would triple the
        file); returns the result."""
        if self.line_open:
            print()
        atomic_save(weights | {self.unit: step, "metrics": self.result, "done": True},
                    self.ckpt_path)
        return self.result
