"""Atomic training checkpoints: model, optimizer, step, RNG states, sampler position and config.

Written by rank 0 only: torch.save to <name>.tmp, flush + fsync, os.replace over <name>, fsync the directory.
A crash mid-write leaves the previous checkpoint intact. Loaded with weights_only=True (plain containers and
tensors only, so RNG states are stored as tensors and lists).
"""
import dataclasses
import hashlib
import os
import random
import time

import numpy as np
import torch

from bitfast.train.dist import barrier

FORMAT = "bitfast-train/1"
# Config keys that change what is computed; a resumed run must agree on them.
MATH_KEYS = ("mode", "model", "weights", "data", "examples_per_class", "seed", "batch", "lr", "steps",
             "resolution", "paper_res", "mixup", "no_flip", "no_crop", "weight_decay", "epochs", "warmup", "loss",
             "norm", "conv", "precision", "fewshot_seed", "dropout", "weight_decay_init", "exclude")


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
    from bitfast.train.config import TrainConfig
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # keys newer than the checkpoint
    return [k for k in MATH_KEYS if not _same(k, saved.get(k, default.get(k)), current.get(k))]


def save_run(S, step, name="last.pt"):
    """Rank 0 writes the whole training state of run `S` (see loop.setup); every rank waits for it."""
    if S.world.main:
        save_atomic({"format": FORMAT, "step": step, "model": S.model.state_dict(),
                        "optimizer": S.opt.state_dict(), "scaler": S.scaler.state_dict() if S.scaler else None,
                        "rng": rng_state(), "sampler": {"step": step, "seed": S.cfg.seed, "batch": S.recipe.batch,
                                                          "examples": len(S.indices),
                                                          "examples_sha256": digest(S.indices)},
                        "config": dataclasses.asdict(S.cfg), "recipe": dataclasses.asdict(S.recipe),
                        "bad_images": sorted(S.bad), "wall_s": S.wall_before + time.time() - S.t_start,
                        "train_images": S.images_before + S.images}, os.path.join(S.cfg.out, name))
    barrier(S.world)


def resume_run(S):
    """Load <out>/last.pt (or cfg.resume) if present; returns the step to start from."""
    path = S.cfg.resume or os.path.join(S.cfg.out, "last.pt")
    if not os.path.exists(path):
        if S.cfg.resume:
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        return 0
    state = load(path, "cpu")  # RNG states must stay on the CPU; load_state_dict moves the rest
    bad = config_mismatch(state["config"], dataclasses.asdict(S.cfg))
    if bad:
        diff = ", ".join(f"{k}: {state['config'].get(k)!r} -> {getattr(S.cfg, k)!r}" for k in bad)
        raise ValueError(f"resume: {path} was written with different settings ({diff}); "
                         "use a new --out, or the original settings")
    if state["sampler"]["examples_sha256"] != digest(S.indices):
        raise ValueError(f"resume: the training examples differ from those in {path} (did the data change?)")
    S.model.load_state_dict(state["model"])
    S.opt.load_state_dict(state["optimizer"])
    if S.scaler and state["scaler"]:
        S.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    S.bad.update(state["bad_images"])
    S.wall_before, S.images_before = state["wall_s"], state["train_images"]
    S.log(f"resuming from {path} at step {state['step']}")
    return int(state["step"])
