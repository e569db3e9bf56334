"""Backend choice for bitfast ops.

Backends: "torch" (pure-torch reference), "cpu" (C++/OpenMP in bitfast._C), "cuda" (CUDA C++ in bitfast._C),
"triton" (bitfast.kernels). One is chosen per call, in this order:

1. the op's explicit ``backend=`` argument;
2. the innermost ``with bitfast.use_backend(name):``, else the ``BITFAST_BACKEND`` environment variable
   (read once at import);
3. auto: on CUDA tensors the backend that passed a correctness check and was fastest on this device, measured on
   first use per shape class and cached on disk (``bitfast.autotune``; ``BITFAST_AUTOTUNE=all`` measures for CPU
   tensors too). Otherwise (``BITFAST_AUTOTUNE=0``, or no shape given) the static choice: CPU tensors use "cpu",
   CUDA tensors the first usable of ``AUTO_CUDA``. If auto has to fall back to "torch" it says so once.

Availability is probed once at import, so resolving a backend is plain dict lookups that torch.compile traces
without a graph break; a measured choice is made while tracing, outside the graph (see autotune._choice).
"""
import contextlib
import importlib
import os
import warnings

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")

# Per op, the CUDA backend the static choice (BITFAST_AUTOTUNE=0) picks first; the other one is the fallback. No
# GPU measurement has informed it yet: autotune measures on the user's GPU instead.
AUTO_CUDA = {"group_norm": ("cuda", "triton"), "weight_standardize": ("cuda", "triton"),
             "weight_standardize_many": ("cuda", "triton")}


class BackendUnavailable(RuntimeError):
    """A backend was asked for but cannot run here; the message says why."""


def _probe_compiled():
    try:
        _C = importlib.import_module("bitfast._C")
    except ImportError as e:
        why = f"not compiled: bitfast._C failed to import ({e}); rebuild with `pip install --no-build-isolation .`"
        return {"cpu": why, "cuda": why}
    cuda_why = None if _C.with_cuda else "not compiled: bitfast._C was built without CUDA kernels (no CUDA toolkit, CPU-only torch, or BITFAST_NO_CUDA=1)"
    return {"cpu": None, "cuda": cuda_why}


def _probe_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    return None


_COMPILED = _probe_compiled()
_TRITON_WHY = _probe_triton()
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HAS_GPU = torch.cuda.is_available()


def compiled_why(name):
    """None if `name` is compiled/installed, else why not (independent of the device)."""
    if name == "torch":
        return None
    if name == "triton":
        return _TRITON_WHY
    return _COMPILED[name]


def usable_why(name, device_type):
    """None if backend `name` can run on tensors of `device_type` ("cpu"/"cuda") right now, else why not."""
    why = compiled_why(name)
    if why is not None or name == "torch":
        return why
    if name == "cpu" and device_type != "cpu":
        return f"the cpu backend runs on CPU tensors, got {device_type} tensors"
    if name == "cuda":
        if not _HAS_GPU:
            return "compiled, but no CUDA GPU is visible (torch.cuda.is_available() is False)"
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device_type} tensors"
    if name == "triton" and device_type == "cpu" and not _INTERPRET:
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
    if name == "triton" and device_type == "cuda" and not _HAS_GPU:
        return "no CUDA GPU is visible"
    return None


def _check_name(name, what):
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{what} must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


_env = os.environ.get("BITFAST_BACKEND") or None
_STACK = [_check_name(_env, "BITFAST_BACKEND") if _env else None]
_WARNED = set()


@contextlib.contextmanager
def use_backend(name):
    """Make `name` the default backend for bitfast ops inside the block (an explicit backend= still wins)."""
    _STACK.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _STACK.pop()


def current_backend():
    """The default set by use_backend()/BITFAST_BACKEND, or None for auto."""
    return _STACK[-1]


def _auto(op, device_type):
    if device_type == "cpu":
        candidates = ("cpu",)
    else:
        candidates = AUTO_CUDA.get(op, ("cuda", "triton"))
    for name in candidates:
        if usable_why(name, device_type) is None:
            return name
    key = (op, device_type)
    if key not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(key)
        reasons = "; ".join(f"{n}: {usable_why(n, device_type)}" for n in candidates)
        warnings.warn(f"bitfast: {op} on {device_type} falls back to the slow pure-torch backend ({reasons})")
    return "torch"


def resolve(op, backend, device_type, sample=None):
    """The backend to run `op` with, for tensors on `device_type`. Raises BackendUnavailable if asked-for is missing.

    sample: what the op's shape class is read from, (x, num_groups) for group_norm and (w, out_dtype) for the WS ops;
    with it, auto measures (bitfast.autotune) on the device types autotune.TUNED names.
    """
    name = backend if backend is not None else _STACK[-1]
    if name is None or name == "auto":
        if sample is not None and device_type in autotune.TUNED:
            return autotune.choose(op, sample)
        return _auto(op, device_type)
    _check_name(name, "backend")
    why = usable_why(name, device_type)
    if why is not None:
        raise BackendUnavailable(f"bitfast: backend {name!r} requested for {op} is not usable: {why}")
    return name


from bitfast import autotune  # noqa: E402  (last: autotune reads this module's names when called)
