"""Checkpoints: torch.save written atomically, torch.load refusing pickles, shapes checked, and
the random state a resumed stage needs to be bit-identical to one that never stopped."""
import pickle
import random
import re

import numpy as np
import torch

from lab.devices import is_main
from lab.weights import atomic_write, regular_file


def atomic_save(obj, path):
    """lab.weights.atomic_write of torch.save(obj), or of obj itself when it is bytes: a crash
    mid-write never leaves a torn file behind. Under torchrun only rank 0 writes: every rank holds
    the same weights and results."""
    if is_main():
        atomic_write(path, lambda f: f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f))


def rng_state() -> dict:
    """Every RNG's state as tensors, ints and lists: what torch.load(weights_only=True) reads
    back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
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
