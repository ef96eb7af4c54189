"""GPT-2 in plain PyTorch, batched sampling with a KV cache, and the scalar-head model used as
reward model and PPO critic. Left to the lab: Hugging Face checkpoint I/O (lab/weights.py) and
decoding's speed tricks (lab/speed.py).

    from model import GPT, GPTConfig
    gpt = GPT.from_pretrained("gpt2")  # a hub name (cached in ~/.cache/mpo/gpt2), or a directory
    out = gpt.generate(prompts, 64, temperature=0.7, eos_id=50256, attention_mask=mask)  # left pads
    gpt.save_pretrained("out/sft")     # loads in transformers.GPT2LMHeadModel.from_pretrained

Padding: a (B, T) attention_mask (1 = real token) works for left and right padding; positions are
cumsum(mask) - 1. Right-padded training batches need no mask: causal attention hides later pads.
Tests: python -m pytest -q tests/test_model.py
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lab.speed import cast_for_decoding, decode_logits, eos_check_every
from lab.weights import load_gpt2, save_gpt2


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    grad_checkpoint: bool = False  # activation checkpointing: keep block inputs, recompute the rest


class KVCache:
    """Every layer's keys and values, preallocated for the whole generation (no per-step cat)."""

    def __init__(self, n_layer, max_len):
        self.kv = [None] * n_layer
        self.max_len = max_len
        self.pos = 0  # positions filled so far; GPT.body advances it after all layers ran

    def update(self, layer, k, v):
        if self.kv[layer] is None:  # allocated on first use: it takes the dtype autocast gave k, v
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.kv[layer] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self.kv[layer]
        end = self.pos + k.size(2)
        keys[:, :, self.pos:end] = k
        values[:, :, self.pos:end] = v
        return keys[:, :, :end], values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.layer = config.n_head, config.dropout, layer

    def forward(self, x, mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # No mask: causal (flash on CUDA). One new token attends to every cached key: no is_causal,
        # which SDPA aligns top-left (the token would see only the first key).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)  # pre-LayerNorm residual blocks (GPT-2)
        return x + self.mlp(self.ln_2(x))


def sdpa_mask(key_mask, T):
    """(B, 1, T, Tk) boolean SDPA mask for the last T of Tk keys: causal AND key is real. A position
    always sees itself, so a pad query row is never all-masked (NaN in some SDPA kernels)."""
    Tk = key_mask.size(1)
    q = torch.arange(Tk - T, Tk, device=key_mask.device)[:, None]
    k = torch.arange(Tk, device=key_mask.device)[None, :]
    return (((k <= q) & key_mask[:, None, :].bool()) | (k == q))[:, None]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input / output embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2 paper: residual projections by 1/sqrt(N)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def body(self, idx, attention_mask=None, cache=None):
        """Final hidden states (B, T, C) after ln_f. With a cache, attention_mask covers the cached
        keys too: shape (B, cache.pos + T)."""
        B, T = idx.shape
        past = 0 if cache is None else cache.pos
        if attention_mask is None:
            position_ids = torch.arange(past, past + T, device=idx.device)
            mask = None if past == 0 or T == 1 else sdpa_mask(idx.new_ones(B, past + T), T)
        else:  # pads do not shift positions (TRL: cumsum of the mask)
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]
            mask = sdpa_mask(attention_mask, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for block in self.transformer.h:
            if self.config.grad_checkpoint and torch.is_grad_enabled():
                # memory for compute: backward runs the block's forward again (~1/3 more FLOPs)
                x = torch.utils.checkpoint.checkpoint(block, x, mask, cache, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, attention_mask=None, logits_from=0):
        """Logits (B, T - logits_from, V): the 50k-wide LM head runs only where they are needed."""
        # contiguous: for a frozen model a strided slice runs as a batched matmul, 1.6x slower
        return self.lm_head(self.body(idx, attention_mask)[:, logits_from:].contiguous())

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 attention_mask=None, pad_id=0, generator=None):
        """Sample max_new_tokens after the (B, T) prompts `idx`, which may be LEFT-padded with an
        attention_mask. Returns (B, T + max_new_tokens); a row's columns after its EOS are pad_id.
        temperature 0 or None is greedy."""
        # under autocast, decode with a copy of the weights cast once, not cast anew at every step
        if (fast := cast_for_decoding(self, idx.device.type)) is not self:
            return fast.generate(idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                 attention_mask, pad_id, generator)
        B, T = idx.shape
        longest = T if attention_mask is None else int(attention_mask.sum(1).max())
        if longest + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens "
                             f"is longer than block_size {self.config.block_size}")
        # made outside inference mode: callers run autograd forwards on the tokens later
        out = F.pad(idx, (0, max_new_tokens), value=pad_id)
        with torch.inference_mode():  # like no_grad, less per-op overhead for the tiny decode ops
            key_mask = None  # pad keys stay hidden in the prefill and every step
            if attention_mask is not None:
                key_mask = F.pad(attention_mask.bool(), (0, max_new_tokens), value=True)
            cache = KVCache(self.config.n_layer, T + max_new_tokens)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            check_every = eos_check_every(idx.device)  # "all done?" stalls a GPU: ask now and then
            # Prefill the prompts once; left-padded, the last column is each row's last real token
            h = self.body(idx, None if key_mask is None else key_mask[:, :T], cache=cache)[:, -1]
            for i in range(max_new_tokens):
                # self.lm_head(h), on CPU in vocabulary chunks: faster with few rows (lab/speed.py)
                token = sample(decode_logits(self, h), temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = token.masked_fill(done, pad_id)
                    done |= token == eos_id
                out[:, T + i] = token
                if i == max_new_tokens - 1 or (eos_id is not None and i % check_every == 0
                                               and bool(done.all())):
                    break
                # positions go on from each row's real length: cumsum(mask) - 1 (or T + i unpadded)
                mask = None if key_mask is None else key_mask[:, :T + i + 1]
                h = self.body(token[:, None], mask, cache=cache)[:, -1]
        return out

    @classmethod
    def from_pretrained(cls, path_or_name, cache_dir=None):
        """Load a Hugging Face GPT-2 checkpoint: a directory (config.json and model.safetensors or
        pytorch_model.bin), one of those weight files, or a hub name (lab.weights.HUB_NAMES)."""
        return load_gpt2(cls, path_or_name, cache_dir)

    def save_pretrained(self, directory):
        """Write model.safetensors and config.json in the Hugging Face GPT-2 layout."""
        save_gpt2(self, directory)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next token (B,) from last-position logits (B, V)."""
    if not temperature:
        return logits.max(-1).indices  # argmax's first maximum too, 3x faster than argmax on CPU
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens before this one already reach top_p
        drop[:, 0] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # Inverse-CDF sampling: one uniform per row (torch.multinomial draws V exponentials). u in
    # (0, 1], so the first index with cdf >= u * total never has zero probability: such a token's
    # cdf equals the one before it.
    cdf = logits.softmax(-1).cumsum(-1)
    u = 1 - torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)


def response_mask(new_tokens, eos_id):
    """(B, R) bool: True on generated tokens up to and including the first EOS (all, if none)."""
    is_eos = (new_tokens == eos_id).long()
    return (is_eos.cumsum(1) - is_eos) == 0  # no EOS strictly before this position


class ScalarModel(nn.Module):
    """GPT body + linear head giving one scalar per token: the reward model and the PPO critic."""

    def __init__(self, config, gpt=None):
        super().__init__()
        self.gpt = gpt if gpt is not None else GPT(config)
        self.head = nn.Linear(config.n_embd, 1, bias=False)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))  # N+'s head init
        # Reward normalisation (N+ detail 11): score = (head - offset) * gain, 0 and 1 until set.
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("gain", torch.ones(()))

    @classmethod
    def from_gpt(cls, gpt):
        return cls(gpt.config, copy.deepcopy(gpt))

    def forward(self, idx, attention_mask=None):
        """Value per token (B, T), in fp32 even under bf16 autocast: bf16's 8-bit mantissa would
        round scores to ~0.01-0.03 and move pairs across MPO's reward-gap threshold."""
        h = self.gpt.body(idx, attention_mask)
        with torch.autocast(idx.device.type, enabled=False):
            return (self.head(h.float()).squeeze(-1) - self.offset) * self.gain

    def score(self, idx, attention_mask=None, lengths=None):
        """(B,) the reward of each row, read at its last real token (the response's EOS, when it
        ended). A right-padded batch may pass its lengths instead of a mask (fast causal path)."""
        if lengths is None:
            positions = torch.arange(idx.size(1), device=idx.device)
            lengths = (attention_mask.long() * positions).argmax(1) + 1
        return self(idx, attention_mask).gather(1, (lengths - 1)[:, None]).squeeze(1)
