"""
GPT-2 in plain PyTorch, the scalar-head model used as reward model and PPO critic, batched sampling
with a KV cache, and reading / writing Hugging Face GPT-2 checkpoints without `transformers`.

    from model import GPT, GPTConfig
    gpt = GPT.from_pretrained("gpt2")  # a hub name (cached in ~/.cache/mpo/gpt2), or a directory
    out = gpt.generate(prompts, 64, temperature=0.7, eos_id=50256, attention_mask=mask)  # left pads
    gpt.save_pretrained("out/sft")     # loads in transformers.GPT2LMHeadModel.from_pretrained

Padding: a (B, T) attention_mask (1 = real token) works for left and right padding; positions are
cumsum(mask) - 1 so pads do not shift them. Right-padded training batches need no mask at all:
causal attention already hides the later pads. Tests: python -m pytest -q tests/test_model.py
"""
import copy
import ctypes
import http.client
import json
import math
import os
import shutil
import stat
import struct
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_URL = "https://huggingface.co/{name}/resolve/main/{file}"
# HF GPT-2 stores these as Conv1D, i.e. (in, out): the transpose of our nn.Linear weights.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
HEAD_CHUNK = 1024  # vocabulary rows per LM-head chunk while decoding (GPT.decode_logits)
EOS_CHECK_EVERY = 16  # decoding steps between the host's looks at "every row has ended" on a GPU


def keep_freed_memory():
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the kernel.
    By default every block over its mmap threshold (at most 32 MB) gets its own mmap and is
    unmapped on free, so each new logits-sized tensor (rows x positions x 50257 floats: hundreds of
    MB) is page-faulted and zeroed by the kernel again; on CPU that system time was about 30% of a
    DPO step. Serving big blocks from the heap (M_MMAP_MAX 0) and never trimming it
    (M_TRIM_THRESHOLD 2 GB) reuses them, as jemalloc does. The price: the process keeps its peak
    memory. The entry points call it (mpo.main, bench.main), importing this file does not; off with
    MPO_MALLOPT=0."""
    if not sys.platform.startswith("linux") or os.environ.get("MPO_MALLOPT") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


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
        # No mask: plain causal attention (the flash kernel on CUDA); a single new token attends to
        # every cached key, so it needs neither mask nor is_causal (which SDPA aligns top-left).
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

    def body(self, idx, attention_mask=None, position_ids=None, cache=None):
        """Final hidden states (B, T, C) after ln_f. With a cache, attention_mask covers the cached
        keys too: shape (B, cache.pos + T)."""
        B, T = idx.shape
        past = 0 if cache is None else cache.pos
        if position_ids is None and attention_mask is None:
            position_ids = torch.arange(past, past + T, device=idx.device)
        elif position_ids is None:  # pads do not shift positions (TRL: cumsum of the mask)
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]
        if attention_mask is None and (past == 0 or T == 1):
            mask = None
        else:
            keys = attention_mask if attention_mask is not None else idx.new_ones(B, past + T)
            mask = sdpa_mask(keys, T)
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

    def forward(self, idx, attention_mask=None, position_ids=None, logits_from=0):
        """Logits (B, T - logits_from, V): the 50k-wide LM head runs only where they are needed."""
        # contiguous: for a frozen model (the reference) matmul runs the strided (B, T', C) slice as
        # a batched matmul against a B-times expanded weight, 1.6x slower than the one GEMM it is
        return self.lm_head(
            self.body(idx, attention_mask, position_ids)[:, logits_from:].contiguous())

    def decode_logits(self, h):
        """LM head on the (B, C) last hidden states of a decoding step. On CPU it runs over the
        vocabulary in chunks: with only B rows, MKL's one (B, C) x (C, 50257) GEMM runs well below
        memory speed (its weight does not fit the cache); chunk by chunk it streams through once.
        Same logits; greedy decoding 25% faster on one thread, 4% on two (bench.py)."""
        w = self.lm_head.weight
        if h.device.type != "cpu" or w.dtype != torch.float32:  # in bf16 the one GEMM is the faster
            return self.lm_head(h)
        chunks = [F.linear(h, w[i:i + HEAD_CHUNK]) for i in range(0, w.size(0), HEAD_CHUNK)]
        return torch.cat(chunks, dim=1)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 attention_mask=None, pad_id=0, generator=None):
        """Sample max_new_tokens after the (B, T) prompts `idx`, which may be LEFT-padded with an
        attention_mask. Returns (B, T + max_new_tokens); a row's columns after its EOS are pad_id.
        temperature 0 or None is greedy."""
        device_type = idx.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else None)
        if dtype is not None and self.lm_head.weight.dtype != dtype:
            # Decode with a copy of the weights cast once: autocast would cast every weight again at
            # every step (its cast cache is off in inference mode), which made bf16 decoding slower
            # than fp32. deepcopy's memo takes each parameter's cast instead of copying it (no
            # fp32 copy in between).
            cast = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    for p in self.parameters()}
            return copy.deepcopy(self, cast).generate(idx, max_new_tokens, temperature, top_k,
                                                      top_p, eos_id, attention_mask, pad_id,
                                                      generator)
        B, T = idx.shape
        if attention_mask is None:
            lengths = torch.full((B,), T, device=idx.device)
        else:
            lengths = attention_mask.sum(1)
        if int(lengths.max()) + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {int(lengths.max())} tokens + {max_new_tokens} new tokens "
                             f"is longer than block_size {self.config.block_size}")
        # `out` is made outside inference mode: callers run autograd forwards on the tokens later
        out = torch.full((B, T + max_new_tokens), pad_id, dtype=torch.long, device=idx.device)
        out[:, :T] = idx
        with torch.inference_mode():  # like no_grad, less per-op overhead for the tiny decode ops
            key_mask = None
            if attention_mask is not None:  # pad keys stay hidden in the prefill and every step
                key_mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=idx.device)
                key_mask[:, :T] = attention_mask.bool()
            cache = KVCache(self.config.n_layer, T + max_new_tokens)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            # "all rows done?" copies a flag to the host, which on a GPU stalls the kernel queue:
            # ask every EOS_CHECK_EVERY steps (the extra steps only write pads); free on a CPU
            check_every = 1 if idx.device.type == "cpu" else EOS_CHECK_EVERY
            # Prefill the prompts once; left-padded, the last column is each row's last real token
            h = self.body(idx, None if key_mask is None else key_mask[:, :T], cache=cache)[:, -1]
            for i in range(max_new_tokens):
                token = sample(self.decode_logits(h), temperature, top_k, top_p, generator)
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
        """Load a Hugging Face GPT-2 checkpoint: a directory holding config.json and
        model.safetensors (or pytorch_model.bin), one of those weight files, or a hub name
        (HUB_NAMES)."""
        path = Path(path_or_name).expanduser()
        if not path.exists() and str(path_or_name) in HUB_NAMES:
            path = download(str(path_or_name), cache_dir)
        if path.is_dir():
            files = [path / f for f in ("model.safetensors", "pytorch_model.bin")
                     if (path / f).exists()]
            if not files:
                raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
            path = files[0]
        if not path.exists():
            raise FileNotFoundError(f"{path_or_name}: no such file or directory, "
                                    f"nor one of {HUB_NAMES}")
        config = read_hf_config(path.parent / "config.json")
        if path.suffix == ".safetensors":
            state = read_safetensors(path)
        else:
            try:
                state = torch.load(regular_file(path), map_location="cpu", weights_only=True,
                                   mmap=True)
                assert isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())
            except Exception as e:  # pickle code refused, a truncated zip, not a state dict
                why = " ".join(str(e).split())[:200]
                raise ValueError(f"{path}: not a weights-only state dict ({why})") from None
        # The config decides what gets allocated: check its parameter count against the file's
        # before anything is built.
        C, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.block_size
        implied = V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
        held = sum(v.numel() for k, v in state.items()
                   if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight")
        if implied != held:
            raise ValueError(f"{path.parent / 'config.json'}: n_layer {L}, n_embd {C}, "
                             f"n_positions {P} and vocab_size {V} imply {implied} parameters, "
                             f"{path.name} holds {held}")
        model = cls(config)
        head = state.get("lm_head.weight")
        wte = state.get("wte.weight", state.get("transformer.wte.weight"))
        # GPT-2 ties the LM head to the token embedding, and so do we
        if head is not None and wte is not None and not torch.equal(head, wte):
            raise ValueError(f"{path}: lm_head.weight differs from wte.weight (an untied head), "
                             "GPT-2 ties them")
        # Keys with or without "transformer."; skip the causal-mask buffers older HF versions saved.
        state = {("" if k.startswith("transformer.") else "transformer.") + k: v
                 for k, v in state.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        ours = model.state_dict()
        expected = set(ours) - {"lm_head.weight"}  # tied to wte
        mismatch = sorted(expected ^ set(state))
        if mismatch:
            what = "missing" if mismatch[0] in expected else "unexpected"
            raise ValueError(f"{path}: key {mismatch[0]} is {what} "
                             f"({len(mismatch)} mismatched keys)")
        with torch.no_grad():
            for key, value in state.items():
                value = value.t() if key.endswith(CONV1D) else value
                if value.shape != ours[key].shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                     f"config.json implies {tuple(ours[key].shape)}")
                ours[key].copy_(value)
        return model

    def save_pretrained(self, directory):
        """Write model.safetensors and config.json in the Hugging Face GPT-2 layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: (v.t() if k.endswith(CONV1D) else v).float().contiguous().cpu()
                 for k, v in self.state_dict().items()
                 if k != "lm_head.weight"}  # tied: HF re-ties it
        write_safetensors(state, directory / "model.safetensors")
        c = self.config
        hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_ctx": c.block_size,
              "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
              "n_head": c.n_head, "vocab_size": c.vocab_size,
              "layer_norm_epsilon": c.layer_norm_epsilon, "activation_function": "gelu_new",
              "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
              "summary_first_dropout": 0.0, "tie_word_embeddings": True}
        atomic_write(directory / "config.json",
                     lambda f: f.write(json.dumps(hf, indent=2).encode()))


def read_hf_config(path) -> GPTConfig:
    """A Hugging Face GPT-2 config.json, validated before any model is built from it (a hostile file
    must not make us build a million layers). HF's dropouts (0.1) are not copied: dropout stays 0,
    as RLHF wants it off (N+ detail)."""
    path = regular_file(path)
    if not path.exists() or path.stat().st_size > 1 << 20:
        why = "missing" if not path.exists() else "over 1 MiB, not a GPT-2 config"
        raise ValueError(f"{path}: {why}")
    try:
        hf = json.loads(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{path}: activation_function {hf['activation_function']}, "
                         "GPT-2 uses gelu_new (tanh approximation)")
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        if type(hf.get(key)) is not int or not 0 < hf[key] <= (1 << 20):
            raise ValueError(f"{path}: {key} must be a positive int (at most 2^20), "
                             f"got {hf.get(key)!r}")
    if hf["n_embd"] % hf["n_head"]:
        raise ValueError(f"{path}: n_embd {hf['n_embd']} is not a multiple of "
                         f"n_head {hf['n_head']}")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise ValueError(f"{path}: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     layer_norm_epsilon=eps)


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
    # Inverse-CDF sampling: one uniform per row, where torch.multinomial draws V exponentials per
    # row (most of a decode step at V = 50257). u lies in (0, 1], so the first index with cdf >= u *
    # total never lands on a zero-probability token: its cdf equals the one before it.
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
        # N+ reward-head init
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))
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
        """(B,) the reward of each row, read at its last real token (the EOS of prompt + response).
        A right-padded batch may pass its lengths instead of a mask: causal attention already hides
        the pads after the last token (the fast SDPA path); else the mask says where each row ends,
        left or right padding."""
        if lengths is None:
            positions = torch.arange(idx.size(1), device=idx.device)
            lengths = (attention_mask.long() * positions).argmax(1) + 1
        return self(idx, attention_mask).gather(1, (lengths - 1)[:, None]).squeeze(1)


def regular_file(path) -> Path:
    """path, checked to be a regular file: a FIFO or a device in its place would block a read."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = ("a directory" if path.is_dir() else
                "a FIFO" if stat.S_ISFIFO(path.stat().st_mode) else "not a file")
        raise ValueError(f"{path}: not a regular file ({kind})")
    return path


MAX_HEADER = 100 << 20  # the safetensors format's own cap on the JSON header


def read_safetensors(path):
    """Parse a safetensors file by hand: 8-byte little-endian header length, a JSON header mapping
    names to dtype / shape / data_offsets (relative to the end of the header), then the raw bytes.
    The header is checked in full (every entry, offsets in range and not overlapping) before the
    tensor bytes are read, so a hostile header allocates nothing."""
    path = regular_file(path)
    size = path.stat().st_size

    def corrupt(why):
        return ValueError(f"{path}: corrupt safetensors header ({why})")

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8).ljust(8, b"\xff"))[0]
        if not 2 <= n <= min(size - 8, MAX_HEADER):
            raise corrupt("bad header length")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise corrupt("not a JSON object") from None
        entries, data_size = [], size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict):
                raise corrupt(f"{name} is not an object")
            if info.get("dtype") not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: {name} has dtype {info.get('dtype')}, "
                                 "supported: F32, F16, BF16")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise corrupt(f"{name} shape {shape!r} is not a list of non-negative ints")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(type(o) is int for o in offsets)):
                raise corrupt(f"{name} data_offsets {offsets!r} is not a pair of ints")
            dtype, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], offsets
            if (not 0 <= begin <= end <= data_size
                    or end - begin != math.prod(shape) * dtype.itemsize):
                raise corrupt(f"{name} data_offsets out of range")
            entries.append((begin, end, name, dtype, shape))
        entries.sort()
        for (_, end, a, *_), (begin, _, b, *_) in zip(entries, entries[1:]):
            if begin < end:
                raise corrupt(f"{a} and {b} overlap")
        raw = bytearray(data_size)
        f.readinto(raw)
    # frombuffer shares memory with `raw`: no second copy of a multi-GB checkpoint
    return {name: torch.frombuffer(raw, dtype=dtype, count=math.prod(shape),
                                   offset=begin).view(shape)
            if math.prod(shape) else torch.empty(shape, dtype=dtype)
            for begin, _, name, dtype, shape in entries}


def write_safetensors(tensors, path, metadata=None):
    """Write contiguous CPU tensors (F32, F16 or BF16) as a safetensors file, atomically."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset += t.numel() * t.element_size()
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so every tensor starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy())  # the tensor's own bytes, not a copy
    atomic_write(path, write)


def atomic_write(path, write, size=None):
    """write(f) into a temporary file, fsync, then rename: a crash never leaves a half-written file
    at `path`. With `size` (a download's Content-Length) a file of another length is refused. A
    failed write (a full disk: torch.save says only "unexpected pos") is an OSError naming
    `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            written = f.tell()
        if size is None or written == size:
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = shutil.disk_usage(path.parent).free < 1 << 20 if path.parent.exists() else False
        why = ("No space left on device" if full
               else getattr(e, "strerror", None) or " ".join(str(e).split()))
        raise OSError(f"{path}: cannot write ({why})") from None
    finally:
        tmp.unlink(missing_ok=True)
    if size is not None and written != size:
        raise RuntimeError(f"{path}: downloaded {written} of {size} bytes (connection lost?); "
                           "run again")


def download_file(url, path, hint):
    """Fetch `url` to `path` once, size-checked against Content-Length and written atomically, so an
    interrupted download never leaves a file that looks complete. Fails in one line that ends with
    `hint`."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = response.headers.get("Content-Length")
            atomic_write(path, lambda f: shutil.copyfileobj(response, f, 1 << 20),
                         None if size is None else int(size))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise RuntimeError(f"cannot download {url} ({' '.join(str(e).split())}); {hint}") from None
    return path


def download(name, cache_dir=None):
    """Fetch config.json and model.safetensors of a hub GPT-2 once into <cache>/<name>; the cache is
    cache_dir, else $MPO_CACHE, else ~/.cache/mpo."""
    root = Path(cache_dir or os.environ.get("MPO_CACHE") or "~/.cache/mpo").expanduser() / name
    root.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        download_file(HUB_URL.format(name=name, file=file), root / file,
                      f"offline? put config.json and model.safetensors from "
                      f"https://huggingface.co/{name} into {root}/")
    return root
