"""
Hugging Face GPT-2 checkpoints without `transformers`: config.json and safetensors read by hand with
checks against hostile files, written in the layout transformers.GPT2LMHeadModel loads, hub
downloads, and atomic writes (also used for the run folders' files and the data downloads).
GPT.from_pretrained and GPT.save_pretrained (model.py) call load_gpt2 and save_gpt2.
"""
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
from pathlib import Path

import torch

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_URL = "https://huggingface.co/{name}/resolve/main/{file}"
# HF GPT-2 stores these as Conv1D, i.e. (in, out): the transpose of our nn.Linear weights.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_gpt2(cls, path_or_name, cache_dir=None):
    """GPT.from_pretrained: a `cls` (GPT) from a Hugging Face GPT-2 checkpoint: a directory
    holding config.json and model.safetensors (or pytorch_model.bin), one of those weight
    files, or a hub name (HUB_NAMES)."""
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
    if bad := [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]:
        raise ValueError(f"{path}: {bad[0]} holds NaN or inf weights ({len(bad)} such tensors)")
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


def gpt2_tensors(model) -> dict:
    """A GPT's weights in the Hugging Face GPT-2 layout: Conv1D weights transposed, fp32, no
    lm_head (tied: HF re-ties it)."""
    return {k: (v.t() if k.endswith(CONV1D) else v).float().contiguous().cpu()
            for k, v in model.state_dict().items() if k != "lm_head.weight"}


def gpt2_config(c) -> dict:
    """A GPTConfig as a Hugging Face GPT-2 config.json."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_ctx": c.block_size,
            "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "vocab_size": c.vocab_size,
            "layer_norm_epsilon": c.layer_norm_epsilon, "activation_function": "gelu_new",
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "summary_first_dropout": 0.0, "tie_word_embeddings": True}


def save_gpt2(model, directory):
    """GPT.save_pretrained: write model.safetensors and config.json in the Hugging Face GPT-2
    layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(gpt2_tensors(model), directory / "model.safetensors")
    hf = gpt2_config(model.config)
    atomic_write(directory / "config.json",
                 lambda f: f.write(json.dumps(hf, indent=2).encode()))


def read_hf_config(path):
    """The GPTConfig of a Hugging Face GPT-2 config.json, validated before any model is built from
    it (a hostile file must not make us build a million layers). HF's dropouts (0.1) are not
    copied: dropout stays 0, as RLHF wants it off (N+ detail)."""
    from model import GPTConfig  # here: model.py imports this file
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
