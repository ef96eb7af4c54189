"""
The speed kernels: each is equal to a plain form in the learner's files (the same numbers, the same
random draws) and is there only to be faster or lighter; also the allocator tuning. bench.py
measures them.
"""
import copy
import ctypes
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import collate_pairs
from lab.devices import map_batches, pick_device

HEAD_CHUNK = 1024  # vocabulary rows per LM-head chunk while decoding (decode_logits)
EOS_CHECK_EVERY = 16  # decoding steps between the host's looks at "every row has ended" on a GPU


def keep_freed_memory():
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the kernel.
    By default every block over its mmap threshold (at most 32 MB) gets its own mmap and is
    unmapped on free, so each new logits-sized tensor (rows x positions x 50257 floats: hundreds of
    MB) is page-faulted and zeroed by the kernel again; on CPU that system time was about 30% of a
    DPO step. Serving big blocks from the heap (M_MMAP_MAX 0) and never trimming it
    (M_TRIM_THRESHOLD 2 GB) reuses them, as jemalloc does. The price: the process keeps its peak
    memory. The entry points call it (lab.cli.main, bench.main), importing this file does not; off
    with MPO_MALLOPT=0."""
    if not sys.platform.startswith("linux") or os.environ.get("MPO_MALLOPT") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


# Decoding (GPT.generate): a cast copy of the weights, the LM head in chunks, fewer host syncs.

def cast_for_decoding(model, device_type):
    """`model` itself, or under autocast to a dtype its weights are not in, a copy of it with every
    weight cast once. Autocast would cast every weight again at every step (its cast cache is off
    in inference mode), which made bf16 decoding slower than fp32. deepcopy's memo takes each
    parameter's cast instead of copying it (no fp32 copy in between)."""
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else None)
    if dtype is None or model.lm_head.weight.dtype == dtype:
        return model
    cast = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, cast)


def decode_logits(model, h):
    """`model.lm_head(h)` on the (B, C) last hidden states of a decoding step. On CPU it runs over
    the vocabulary in chunks: with only B rows, MKL's one (B, C) x (C, 50257) GEMM runs well below
    memory speed (its weight does not fit the cache); chunk by chunk it streams through once.
    Same logits; greedy decoding 25% faster on one thread, 4% on two (bench.py)."""
    w = model.lm_head.weight
    if h.device.type != "cpu" or w.dtype != torch.float32:  # in bf16 the one GEMM is the faster
        return model.lm_head(h)
    chunks = [F.linear(h, w[i:i + HEAD_CHUNK]) for i in range(0, w.size(0), HEAD_CHUNK)]
    return torch.cat(chunks, dim=1)


def eos_check_every(device):
    """Decoding steps between looks at "have all rows ended?". The look copies a flag to the host,
    which on a GPU stalls the kernel queue: ask every EOS_CHECK_EVERY steps (the extra steps only
    write pads); on a CPU it is free, so every step."""
    return 1 if device.type == "cpu" else EOS_CHECK_EVERY


# The log-prob kernel (dpo.py, ppo.py): token log-probs with less memory than autograd's, the
# same numbers.

def token_logps(logits, tokens):
    """Log-prob (B, T) of each token under the logits (B, T, V) at its own position, in fp32 (bf16
    log-probs of long responses are too coarse, TRL #878). Also PPO's per-token log-probs. Equal to
    the reference `F.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)`, computed
    by TokenLogps with one vocabulary-sized buffer instead of several."""
    return TokenLogps.apply(logits.float(), tokens)


class TokenLogps(torch.autograd.Function):
    """log p = logit[target] - logsumexp(logits), with its backward written out: the gradient
    (onehot(target) - softmax(logits)) * grad, built in place in one (B, T, V) buffer. Autograd's
    own backward (logsumexp's and gather's, then their sum) fills four; at a 50k vocabulary this
    made the log-probs' forward + backward 1.6x faster, with identical numbers (bench.py
    dpo_step)."""

    @staticmethod
    def forward(ctx, logits, tokens):
        lse = torch.logsumexp(logits, dim=-1)  # unlike log_softmax, no second (B, T, V) tensor
        ctx.save_for_backward(logits, tokens, lse)
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):
        logits, tokens, lse = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_logits = (logits - lse.unsqueeze(-1)).exp_().mul_(-grad)  # -softmax * grad
        return grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad), None


def with_ref_logps(response_logps, ref, pairs, eval_pairs, cfg, stage="dpo"):
    """The DPO stage's pairs, and held-out pairs, each extended with the reference's (chosen,
    rejected) summed log-probs (`response_logps` of `ref`), computed once in batches of
    cfg.batch_size, and the collate that puts them in a batch as "ref_logps": training then needs
    no reference forward (TRL's precompute_ref_log_probs). Returns (pairs, eval_pairs, collate)."""
    print(f"{stage}: reference log-probs of {len(pairs) + len(eval_pairs or [])} pairs")

    def extend(rows):
        logps = map_batches(response_logps, ref, rows, collate_pairs, cfg.batch_size,
                            pick_device(cfg.device), cfg.dtype, f"{stage}: reference log-probs")
        chosen, rejected = zip(*(b.chunk(2) for b in logps))  # collate_pairs: chosen rows first
        return [(*pair, c, r) for pair, c, r in
                zip(rows, torch.cat(chosen).tolist(), torch.cat(rejected).tolist())]

    return extend(pairs), eval_pairs and extend(eval_pairs), collate_with_ref


def collate_with_ref(rows):
    """collate_pairs plus the precomputed reference log-probs in the same order: chosen rows, then
    rejected."""
    batch = collate_pairs([row[:3] for row in rows])
    batch["ref_logps"] = torch.tensor([row[3] for row in rows] + [row[4] for row in rows])
    return batch
