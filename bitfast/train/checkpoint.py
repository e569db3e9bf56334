"""Atomic training checkpoints: model, optimizer, step, RNG states, sampler position and config.

Written by rank 0 only: torch.save to <name>.tmp, flush + fsync, os.replace over <name>, fsync the directory.
A crash mid-write leaves the previous checkpoint intact. Loaded with weights_only=True (plain containers and
tensors only, so RNG states are stored as tensors and lists).
"""
import hashlib
import os
import random

import numpy as np
import torch

FORMAT = "bitfast-train/1"
# Config keys that change what is computed; a resumed run must agree on them.
MATH_KEYS = ("mode", "model", "weights", "data", "examples_per_class", "seed", "batch", "lr", "steps",
             "resolution", "paper_res", "mixup", "no_flip", "no_crop", "weight_decay", "epochs", "warmup", "loss",
             "norm", "conv", "precision")


def save_atomic(obj, path):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems do not allow fsync on a directory
        pass


def load(path, map_location="cpu"):
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"resume: no checkpoint at {path}") from None
    except Exception as e:
        raise ValueError(f"resume: {path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"resume: {path} is not a bitfast-train checkpoint (format {FORMAT})")
    return obj


def rng_state():
    key, pos, has_gauss, gauss = np.random.get_state()[1:]
    state = {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def digest(indices):
    """Short fingerprint of the training example indices (a few-shot subset, a data folder listing)."""
    return hashlib.sha256(np.ascontiguousarray(indices, np.int64).tobytes()).hexdigest()[:16]


def _same(key, a, b):
    if key in ("data", "weights") and isinstance(a, str) and isinstance(b, str) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)  # the same path written another way
    return a == b


def config_mismatch(saved, current):
    """Names of math-relevant config keys whose values differ (for a clear resume error)."""
    return [k for k in MATH_KEYS if not _same(k, saved.get(k), current.get(k))]
