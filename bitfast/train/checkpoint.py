"""The run directory: one run at a time (a lock), atomic outputs, and training checkpoints.

Every file a run writes goes through `atomic_write`: write <name>.tmp, flush + fsync, os.replace over <name>,
fsync the directory. A kill at any moment leaves either the old file or the new one, never a part; stale
*.tmp files of a killed run are removed by the next run, which holds the lock. Checkpoints (rank 0 only) hold
model, optimizer, step, RNG states, sampler position, config and recipe; they are loaded with weights_only=True
(plain containers and tensors only, so RNG states are stored as tensors and lists).
"""
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import socket
import time

import numpy as np
import torch

from bitfast.train.dist import barrier

FORMAT = "bitfast-train/1"
OUTPUTS = ("last.pt", "model.pt", "summary.json", "plot.png", "config.json", "metrics.jsonl", "data_index.npz",
           "data_index_eval.npz", "folder_index.npz", "folder_index_eval.npz")
# Config keys that change what is computed and are not already fixed in the Recipe; a resumed run must agree.
MATH_KEYS = ("mode", "model", "weights", "data", "examples_per_class", "seed", "loss", "norm", "conv", "precision",
             "fewshot_seed", "dropout", "weight_decay_init", "exclude")
# Resolved values: `--lr 0.003` equals the default, `20x16` equals `20,16`, `--steps 500` equals the rule's 500.
RECIPE_KEYS = ("dataset_size", "num_classes", "resize", "crop", "flip", "random_crop", "supports", "lr",
               "weight_decay", "mixup", "batch", "loss", "head_bias", "wd_on", "eval_crop", "crop_area")
UPSTREAM_KEYS = ("schedule", "minival")  # only the upstream recipe reads these


class NonFiniteLoss(RuntimeError):
    """The NaN guard stopped the run (a non-finite loss, gradient or state); the message names the last good
    checkpoint."""


def _fsync_dir(d):
    try:  # make a rename durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems do not allow fsync on a directory
        pass


def atomic_write(path, write):
    """Call write(f) on <path>.tmp, then rename it over `path`: `path` is whole or untouched. An OSError (no space
    left on device, read-only filesystem, ...) comes back naming `path`; the partial .tmp is removed."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_atomic(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def lock_run_dir(out):
    """Create `out`, take an exclusive flock on <out>/.lock (the kernel drops it when the process dies, however
    it dies; its forked DataLoader workers hold it until they exit: see ORPHAN_WAIT_S) and remove the .tmp files
    of a killed run. Returns the lock's fd; close it to release."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot use it as the run directory ({e.strerror})") from None
    deadline = time.time() + ORPHAN_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if e.errno in (errno.EAGAIN, errno.EACCES) and _gone(holder) and time.time() < deadline:
                time.sleep(0.2)
                continue
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise ValueError(f"--out {out}: cannot lock the run directory ({e.strerror})") from None
            gone = (f"; it is gone, but processes it started still hold the lock after {ORPHAN_WAIT_S} s"
                    if _gone(holder) else "")
            raise ValueError(f"--out {out}: another bitfast-train run is using this directory ({holder}{gone}); "
                             "wait for it to end, or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    for name in OUTPUTS:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name + ".tmp"))
    return fd


# A killed run's DataLoader workers (forked: they share its lock) notice within 5 s that it died, and exit after
# the batch in hand; until then a restart (torchrun --max-restarts, a rerun) waits instead of failing.
ORPHAN_WAIT_S = 30


def _gone(holder):
    """True when the lock file names a process of this host that no longer exists ("pid N on HOST")."""
    words = holder.split()
    if len(words) != 4 or words[0] != "pid" or words[2] != "on" or words[3] != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


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


def _canon(key, v):
    """A config value as it resolves: real paths; a built-in data name with its source and parsed class list."""
    if isinstance(v, str) and key in ("weights", "exclude"):
        return os.path.realpath(os.path.expanduser(v))
    if isinstance(v, str) and key == "data":
        from bitfast.train.data import canonical_spec
        return canonical_spec(v)
    return v


def resolved(cfg):
    """The MATH_KEYS of `cfg` as they resolve now (a checkpoint stores them: a relative path given from another
    directory on resume still compares right)."""
    keys = MATH_KEYS + (UPSTREAM_KEYS if cfg.mode == "upstream" else ())
    return {k: _canon(k, getattr(cfg, k)) for k in keys}


def settings_mismatch(state, cfg, recipe):
    """[(name, saved, current)] for each resolved setting that differs: empty means the same computation."""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}  # keys newer than the checkpoint
    saved = state.get("resolved") or {k: _canon(k, v) for k, v in state["config"].items()}  # older checkpoints
    diff = [(k, saved.get(k, _canon(k, default.get(k))), v) for k, v in resolved(cfg).items()]
    now = dataclasses.asdict(recipe)
    old = {f.name: f.default for f in dataclasses.fields(recipe)}  # recipe keys newer than the checkpoint
    diff += [(k, state["recipe"].get(k, old.get(k)), now[k]) for k in RECIPE_KEYS]
    return [(k, a, b) for k, a, b in diff if a != b]


def finite(tensors):
    """True when no floating tensor holds nan or inf (the max-abs norm is finite exactly then; one sync)."""
    ts = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return not ts or bool(torch.isfinite(torch.nn.utils.get_total_norm(ts, math.inf)))


def state_tensors(S):
    return [*S.model.state_dict().values(), *(v for st in S.opt.state.values() for v in st.values())]


def save_run(S, step, name="last.pt"):
    """Rank 0 writes the whole training state of run `S` (see loop.setup); every rank waits for it. A non-finite
    state is never written: the checkpoint on disk stays the last finite one."""
    path = os.path.join(S.cfg.out, name)
    if S.world.main:
        if not finite(state_tensors(S)):
            raise NonFiniteLoss(f"refusing to overwrite {path} with non-finite weights or optimizer state (step "
                                f"{step}); it keeps the last finite state")
        save_atomic({"format": FORMAT, "step": step, "model": S.model.state_dict(),
                     "optimizer": S.opt.state_dict(), "scaler": S.scaler.state_dict() if S.scaler else None,
                     "rng": rng_state(), "sampler": {"step": step, "seed": S.cfg.seed, "batch": S.recipe.batch,
                                                     "examples": len(S.indices), "examples_sha256": digest(S.indices),
                                                     "stream": S.stream},
                     "config": dataclasses.asdict(S.cfg), "recipe": dataclasses.asdict(S.recipe),
                     "resolved": resolved(S.cfg),
                     "bad_images": sorted(S.bad), "wall_s": S.wall_before + time.time() - S.t_start,
                     "train_images": S.images_before + S.images, "window": S.progress.window()}, path)
        if S.cfg.keep_ckpts and name == "last.pt":
            keep_last(S.cfg.out, path, step, S.cfg.keep_ckpts)
    S.saved_step, S.last_save = step, time.time()
    barrier(S.world)


def keep_last(out, path, step, k):
    """Hard-link `path` as <out>/ckpt-<step>.pt (no copy: last.pt's next atomic replace is a new file) and remove
    all but the newest k of them."""
    kept = os.path.join(out, f"ckpt-{step:08d}.pt")
    with contextlib.suppress(FileNotFoundError):
        os.remove(kept)
    os.link(path, kept)
    old = sorted(n for n in os.listdir(out) if n.startswith("ckpt-") and n.endswith(".pt"))
    for n in old[:-k]:
        os.remove(os.path.join(out, n))
    _fsync_dir(out)


def continued(own, resume):
    """<out>/last.pt (`own`) when a run started from `resume` wrote it: the same command, re-run or restarted by
    torchrun --max-restarts, goes on from there instead of going back to `resume`. Else None."""
    if not (resume and os.path.exists(own) and os.path.exists(resume)) or os.path.samefile(own, resume):
        return None
    state = load(own, "cpu")
    started = state["config"].get("resume")
    return state if started and os.path.realpath(started) == os.path.realpath(resume) else None


def resume_run(S):
    """Load <out>/last.pt (or cfg.resume, unless this command already went on from it) if present; returns the
    step to start from."""
    own = os.path.join(S.cfg.out, "last.pt")
    state = continued(own, S.cfg.resume)
    path = own if state is not None else S.cfg.resume or own
    if not os.path.exists(path):
        if S.cfg.resume:
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        return 0
    if state is None:
        state = load(path, "cpu")  # RNG states must stay on the CPU; load_state_dict moves the rest
    bad = settings_mismatch(state, S.cfg, S.recipe)
    if bad:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in bad)
        raise ValueError(f"resume: {path} was written with different settings ({diff}); "
                         "use a new --out, or the original settings")
    if state["sampler"].get("stream") != S.stream:
        raise ValueError(f"resume: {path} streamed its shards over {state['sampler'].get('stream')} (ranks, workers); "
                         f"now {S.stream}: resume with the same world size and --workers")
    if state["sampler"]["examples_sha256"] != digest(S.indices):
        raise ValueError(f"resume: the training examples differ from those in {path} (did the data change?)")
    S.model.load_state_dict(state["model"])
    S.opt.load_state_dict(state["optimizer"])
    if S.scaler and state["scaler"]:
        S.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    S.bad.update(state["bad_images"])
    S.wall_before, S.images_before = state["wall_s"], state["train_images"]
    S.window = state.get("window")  # the train-loss window open at the checkpoint (older checkpoints: none)
    S.saved_step = int(state["step"])
    S.log(f"resuming from {path} at step {state['step']}" + (f" (this run started from {S.cfg.resume})"
                                                             if S.cfg.resume and path == own else ""))
    return int(state["step"])
