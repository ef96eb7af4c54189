"""Speed benchmarks: tokens/s and MFU of the SFT, reward-model and DPO training steps, of generation
with the KV cache, and of one PPO iteration, each through the code the stages run (their loss
functions, train.adamw, ppo.rollout and ppo.ppo_update), on a randomly initialised GPT-2-shaped
model and random tokens.

    python bench.py        # 4 layers, 4 heads, 256 wide, 50,257 vocab, batch 8, 64 + 64 tokens
    python bench.py --dtype fp32 --only dpo_step generate_greedy
    python bench.py --n-layer 12 --n-head 12 --n-embd 768 --device cuda --compile   # GPT-2 small
    python bench.py --n-layer 36 --n-head 20 --n-embd 1280 --device cuda --grad-checkpoint --batch 4

The last runs the gpt2-large shape. docs/speed.md has the numbers measured on this project's
machine, the comparison with TRL / transformers, and what made the difference.

Prints one JSON line per benchmark (name, tokens_per_s, mfu, peak_mem_mb, device, dtype, ...), after
a line with the machine's matmul peak in that dtype: GFLOP/s of a large matmul. Each --dtype runs
the whole set: fp32, and bf16 autocast as the stages run it with --dtype bf16 (by default also,
where the hardware has fast bf16: CUDA, or a CPU with AMX). tokens_per_s counts the batch's tokens,
rows x (prompt + response), for a training step, and new tokens for generation and for PPO (over the
whole iteration). mfu = achieved FLOP/s / that peak. FLOPs counted: 2 per matmul parameter per token
for a forward, 6 for forward + backward (Kaplan et al. 2020), where the parameters are those of the
transformer blocks on every token they run on and the vocab x C LM head only on the positions where
it runs (no logits on prompt positions); embedding lookups and attention scores (4 T C per layer per
token, under 10% at these sizes) are not counted. Each benchmark runs --warmup untimed iterations,
then reports the median of --iters timed ones. peak_mem_mb is the peak GPU memory allocated on CUDA;
on CPU it is the process's peak resident memory (VmHWM, reset before each benchmark), of which
runtime_mem_mb (the resident size before any model was built: the torch runtime) is not the step's.
Training steps also print est_mem_mb, lab.estimates.memory_estimate's figure for the step, which
mpo.py prints at start.
"""
import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from data import collate_pairs, collate_sft
from dpo import DPOConfig, dpo_step_loss
from lab.devices import autocast, pick_device, to_device
from lab.estimates import memory_estimate
from lab.speed import keep_freed_memory
from model import GPT, GPTConfig, ScalarModel
from mpo import RMConfig, SFTConfig, reward_model_loss, sft_loss
from ppo import Models, PPOConfig, gae, optimizers, ppo_update, rollout, shape_rewards
from train import adamw


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux)
            f.write("5")


def peak_memory_mb(device, field="VmHWM"):
    """Peak GPU memory allocated; on CPU the process's peak (VmHWM) or present (VmRSS) RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def timed(fn, device, warmup, iters):
    """Median seconds of fn() over `iters` runs after `warmup` untimed ones, and the peak memory."""
    for _ in range(warmup):
        fn()
    reset_peak_memory(device)
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_memory_mb(device)


def matmul_peak(device, dtype, n=2048, iters=10):
    """Best GFLOP/s of an n x n by n x n matmul (2 n^3 FLOPs): the ceiling MFU is measured by."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(iters + 2):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def fast_bf16(device):
    """CUDA, or a CPU with AMX tile units (Linux /proc/cpuinfo flag amx_bf16)."""
    cpuinfo = Path("/proc/cpuinfo")
    return device.type == "cuda" or (cpuinfo.exists() and "amx_bf16" in cpuinfo.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("n-layer", 4), ("n-head", 4), ("n-embd", 256), ("vocab", 50257),
                          ("batch", 8), ("prompt-len", 64), ("response-len", 64),
                          ("ppo-epochs", 4), ("warmup", 2), ("iters", 5)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models of the training steps")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing in the training steps")
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"),
                   help="run every benchmark in each "
                        "(default: fp32, and bf16 where the hardware is fast at it)")
    p.add_argument("--only", nargs="*", help="run only these benchmarks (names as printed)")
    args = p.parse_args()
    keep_freed_memory()  # glibc malloc reuses freed logits-sized blocks (lab/speed.py)
    device = pick_device(args.device)
    for dtype in args.dtype or (["fp32", "bf16"] if fast_bf16(device) else ["fp32"]):
        run_benchmarks(args, device, dtype)


def run_benchmarks(args, device, dtype):
    torch.manual_seed(0)
    # on CPU the resident size before any model: the torch runtime, which no estimate counts
    runtime_mb = 0 if device.type == "cuda" else round(peak_memory_mb(device, "VmRSS"))
    B, P, R = args.batch, args.prompt_len, args.response_len
    config = GPTConfig(block_size=max(1024, P + R), vocab_size=args.vocab, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, grad_checkpoint=args.grad_checkpoint)
    policy = GPT(config).to(device)
    n_body = sum(p.numel() for p in policy.transformer.h.parameters())
    n_head = args.vocab * args.n_embd
    peak = matmul_peak(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    common = {"device": str(device), "dtype": dtype,
              **({"runtime_mem_mb": runtime_mb} if runtime_mb else {})}
    print(json.dumps({"name": "matmul_peak", "gflops": round(peak, 1), **common,
                      "threads": torch.get_num_threads()}), flush=True)

    def report(name, seconds, mem, tokens, flops, **extra):
        print(json.dumps({"name": name, "tokens_per_s": round(tokens / seconds, 1),
                          "mfu": float(f"{flops / seconds / 1e9 / peak:.3g}"),
                          "peak_mem_mb": round(mem), **common,
                          "s_per_step": float(f"{seconds:.4g}"), **extra}), flush=True)

    def wanted(name):
        return not args.only or name in args.only

    def ids(n):
        return torch.randint(args.vocab, (n,)).tolist()

    # per row: the blocks on body_tokens, the LM head on head_positions
    def flops(factor, rows, body_tokens, head_positions):
        return factor * rows * (n_body * body_tokens + n_head * head_positions)

    def train_step_bench(name, model, loss_fn, batch, cfg, rows, fwd_flops, ref_flops=0,
                         head_positions=R):
        """One optimizer step as in train.train (grad_accum 1): loss, backward, clip, AdamW."""
        model.train()
        fwd = torch.compile(model) if args.compile else model
        opt = adamw(model, cfg, device)
        params = [p for p in model.parameters() if p.requires_grad]
        batch = to_device(batch, device)

        def step():
            with autocast(device, dtype):
                loss, _ = loss_fn(fwd, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds, mem = timed(step, device, args.warmup, args.iters)
        estimate = memory_estimate(config, rows, P + R, head_positions, frozen=int(ref_flops > 0),
                                   bf16=dtype == "bf16")
        report(name, seconds, mem, rows * (P + R), 3 * fwd_flops + ref_flops, rows=rows,
               seq_len=P + R, est_mem_mb=round(estimate["total"] / 2**20))

    # The log-prob losses run the model on all but the last token, the LM head from position
    # P - 1 on: the R positions that predict response tokens. The reward model runs on every
    # token, with no LM head.
    if wanted("sft_step"):
        batch = collate_sft([(ids(P), ids(R)) for _ in range(B)])
        train_step_bench("sft_step", policy, sft_loss, batch, SFTConfig(), B,
                         flops(2, B, P + R - 1, R))
    pairs = collate_pairs([(ids(P), ids(R), ids(R)) for _ in range(B)])
    if wanted("rm_step"):
        rm = ScalarModel.from_gpt(policy)
        cfg = RMConfig()
        train_step_bench("rm_step", rm, lambda m, b: reward_model_loss(m, b, cfg), pairs, cfg,
                         2 * B, flops(2, 2 * B, P + R, 0), head_positions=0)
        del rm
    if wanted("dpo_step"):  # the reference forward every step: DPOConfig(precompute_ref=False)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        cfg = DPOConfig()
        train_step_bench("dpo_step", policy, lambda m, b: dpo_step_loss(m, ref, b, cfg), pairs,
                         cfg, 2 * B, flops(2, 2 * B, P + R - 1, R),
                         ref_flops=flops(2, 2 * B, P + R - 1, R))
        del ref

    policy.eval()
    prompts = torch.randint(args.vocab, (B, P), device=device)
    for name, temperature in (("generate_greedy", 0.0), ("generate_sample", 1.0)):
        if wanted(name):  # no eos_id: every row generates all R tokens
            def gen():
                with autocast(device, dtype):
                    policy.generate(prompts, R, temperature=temperature)
            seconds, mem = timed(gen, device, args.warmup, args.iters)
            # prefill: body on P tokens, head on the last; then R - 1 decode steps of body + head
            report(name, seconds, mem, B * R, 2 * B * (n_body * (P + R - 1) + n_head * R),
                   new_tokens=R)

    if wanted("ppo_iteration"):
        cfg = PPOConfig(prompts_per_step=B, samples_per_prompt=1, max_new_tokens=R,
                        ppo_epochs=args.ppo_epochs, num_minibatches=1, micro_batch_size=B,
                        device=str(device), dtype=dtype)
        rm = ScalarModel.from_gpt(policy).eval().requires_grad_(False)
        ref = copy.deepcopy(policy).requires_grad_(False)
        critic = copy.deepcopy(rm).requires_grad_(True)
        models = Models(policy, ref, rm, critic)
        opts = optimizers(models, cfg, device)
        prompt_ids = [ids(P) for _ in range(B)]
        splits = []

        def ppo_iter():  # the rollout, rewards, GAE and update phases of ppo.ppo's loop
            it = len(splits)
            start = time.time()
            generator = torch.Generator(device).manual_seed(it)
            ro = rollout(models, prompt_ids, args.vocab - 1, cfg, generator)
            mask = ro.mask.float()
            rewards, _ = shape_rewards(ro.scores, ro.has_eos, ro.logp, ro.ref_logp, mask,
                                       cfg.kl_coef, cfg)
            ro.advantages, ro.returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
            scored = time.time()
            ppo_update(models, opts, ro, cfg, torch.Generator().manual_seed(it))
            splits.append((ro.generate_s, scored - start - ro.generate_s, time.time() - scored,
                           int(ro.mask.size(1))))
        seconds, mem = timed(ppo_iter, device, 1, args.iters)
        generate_s, score_s, update_s, r = (statistics.median(x) for x in zip(*splits[1:]))
        r = int(r)
        # generation as above; rollout forwards: policy + reference (LM head on r rows), critic
        # on P + r - 1 tokens, RM on P + r; each PPO epoch: forward + backward of policy and critic
        body = n_body * (P + r - 1)
        gen_flops = 2 * B * (n_body * (P + r - 1) + n_head * r)
        score_flops = 2 * B * (2 * (body + n_head * r) + body + n_body * (P + r))
        update_flops = 6 * B * args.ppo_epochs * (2 * body + n_head * r)
        estimate = memory_estimate(config, B, P + R, R, trained=2, frozen=2, bf16=dtype == "bf16")
        report("ppo_iteration", seconds, mem, B * r, gen_flops + score_flops + update_flops,
               s_per_iter=round(seconds, 3), est_mem_mb=round(estimate["total"] / 2**20),
               prompts=B, prompt_len=P, new_tokens=r, ppo_epochs=args.ppo_epochs, minibatches=1,
               generate_s=round(generate_s, 3), score_s=round(score_s, 3),
               update_s=round(update_s, 3))


if __name__ == "__main__":
    main()
