"""Estimates printed as a run starts: the peak memory of each stage, the batch a device can
sample with, and a rough time per stage from timed steps on the device at hand."""
import datetime
import time
from functools import partial

import torch

from lab.devices import autocast, autocast_dtype
from train import optimizer_steps


def forward_flops(config, head: int) -> int:
    """FLOPs of one token's forward: 2 per weight it is multiplied by (Kaplan et al. 2020, table
    1): 12 n_layer n_embd^2 in the blocks (attention's four projections, the MLP's two) and the
    head, n_embd x `head` (the vocabulary for the LM, 1 for a scalar model); the embeddings are
    lookups. Attention's own term, 4 n_layer n_embd x context, is left out (about a tenth or less at
    the demo's and the author's lengths). A backward costs two forwards."""
    return 2 * (12 * config.n_layer * config.n_embd ** 2 + config.n_embd * head)


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


# The lines a run prints as it starts: what it will hold in memory and how long it will take.

def print_memory_estimate(config, cfgs, device):
    """One line at start: the estimated peak memory of each training stage (memory_estimate).
    SFT and DPO run the LM head from the shortest prompt of a batch on: up to every position. DPO
    keeps its reference and the RM (from scoring) on the device; PPO trains policy and critic beside
    the reference and the RM, with the LM head on the response positions only."""
    R = cfgs["run"].max_response_len
    seq = cfgs["run"].max_prompt_len + R
    bf16 = {g: autocast_dtype(device, cfgs[g].dtype) == torch.bfloat16
            for g in ("sft", "rm", "dpo", "ppo")}

    def estimate(group, rows, **kw):
        return memory_estimate(config, rows, seq, bf16=bf16[group], **kw)

    sizes = {"sft": estimate("sft", cfgs["sft"].batch_size, head_positions=seq - 1),
             "rm": estimate("rm", 2 * cfgs["rm"].batch_size, head_positions=0),
             "dpo": estimate("dpo", 2 * cfgs["dpo"].batch_size, head_positions=seq - 1, frozen=2),
             "ppo": estimate("ppo", cfgs["ppo"].micro_batch_size, head_positions=R, trained=2,
                             frozen=2)}
    dtypes = sorted({"bf16" if b else "fp32" for b in bf16.values()})
    print(f"memory estimate ({device.type}, {' / '.join(dtypes)}"
          f"{', activation checkpointing' if config.grad_checkpoint else ''}): "
          + ", ".join(f"{name} {size['total'] / 2**30:.2f} GiB" for name, size in sizes.items())
          + " per process (weights, AdamW state, one micro-batch's activations and logits; lower a "
          "stage's batch_size or add --grad_checkpoint if that is more than the device has)")


def print_plan(cfgs, base, sft_rows, pairs, device):
    """One line at start: each stage's work and a rough time, from a timed forward + backward of one
    SFT micro-batch of full-length rows and timed decoding steps (time_probe) times the work,
    training scaled by the rows' mean length. MPO's two stages are counted at half the data each, as
    on HH-RLHF (45,600 easy pairs, 40,712 hard); sampling at the full response length (an upper
    bound)."""
    run, split, ppo_cfg, ev = cfgs["run"], cfgs["split"], cfgs["ppo"], cfgs["eval"]
    R = run.max_response_len
    seq = run.max_prompt_len + run.max_response_len
    bs = cfgs["sft"].batch_size
    ppo_rows = ppo_cfg.prompts_per_step * ppo_cfg.samples_per_prompt
    t = time_probe(base, bs, seq, (split.batch_size, ppo_rows), device, run.dtype)
    row = t["train_step"] / bs  # seconds of forward + backward per full-length row
    n_sft, n_pairs, n_prompts = len(sft_rows), len(pairs), len({tuple(row[0]) for row in pairs})
    n_split = n_pairs if split.source == "human" or split.pairs_per_row else n_prompts
    length = {  # mean row length / full length: of an SFT row (1), of a pair's rows (2)
        1: sum(len(p) + len(r) for p, r in sft_rows) / max(1, n_sft) / seq,
        2: sum(len(p) + (len(c) + len(r)) / 2 for p, c, r in pairs) / max(1, n_pairs) / seq}

    def trained(cfg, rows, width):  # optimizer steps x rows per step x width rows each (2: a pair)
        rows_trained = optimizer_steps(cfg, rows) * cfg.batch_size * cfg.grad_accum * width
        return rows_trained * row * length[width]

    def ppo_time(prompts):  # rollouts, 4 scoring forwards (1/3 of a forward + backward), the update
        iterations = ppo_cfg.passes * -(-prompts // ppo_cfg.prompts_per_step)
        passes = 4 / 3 + 2 * ppo_cfg.ppo_epochs
        rollout = R * t[f"decode_step_{ppo_rows}"] + ppo_rows * row * length[2] * passes
        evals = 1 + ev.prompts / ppo_rows / max(ppo_cfg.eval_every, 1)
        return iterations, iterations * rollout * evals

    def sample(n):
        return -(-n // split.batch_size) * R * t[f"decode_step_{split.batch_size}"]

    def steps(group, rows):
        return f"{optimizer_steps(cfgs[group], rows):,} steps"

    ppo_all, ppo_all_s = ppo_time(n_prompts)
    dpo = partial(trained, cfgs["dpo"], width=2)
    plan = {f"sft {steps('sft', n_sft)}": trained(cfgs["sft"], n_sft, 1),
            f"rm {steps('rm', n_pairs)}": trained(cfgs["rm"], n_pairs, 2),
            f"pairs {2 * n_split:,} samples":
                sample(2 * n_split) if split.source == "resample" else 0.0,
            f"dpo_all {steps('dpo', n_split)}": dpo(n_split) * 7 / 6,
            f"ppo_all {ppo_all:,} iterations": ppo_all_s,
            "mpo_dpo + mpo": dpo(n_split // 2) * 7 / 6 + ppo_time(n_prompts // 2)[1],
            f"evaluation {ev.prompts * ev.samples:,} samples per model":
                4 * sample(ev.prompts * ev.samples)}

    def fmt(seconds):
        return str(datetime.timedelta(seconds=round(seconds)))

    print(f"plan (rough, {device.type}): " + " | ".join(f"{k} ~{fmt(v)}" for k, v in plan.items())
          + f" | total ~{fmt(sum(plan.values()))}; every stage prints its own rate and ETA")
