"""What this install can do: versions, compiled backends, usable backends and why the others are not, and the
backends autotune chose (and excluded) on this machine."""
import platform

import torch

from bitfast import _backend, autotune
from bitfast.version import __version__


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def report():
    """The info() text as a list of lines."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    lines = [
        f"bitfast {__version__}",
        f"python  {platform.python_version()}",
        f"torch   {torch.__version__} (CUDA build: {torch.version.cuda or 'no, CPU-only'})",
        f"triton  {_triton_version()}",
        f"GPU     {gpu}",
        f"default backend: {_backend.current_backend() or 'auto'} (set with backend=, bitfast.use_backend() or BITFAST_BACKEND)",
        "",
        f"{'backend':8} {'compiled':9} {'usable now':11} why not",
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in _backend.BACKENDS:
        compiled_why = _backend.compiled_why(name)
        # the cpu backend is judged on CPU tensors; the others on the GPU if there is one
        why = _backend.usable_why(name, "cpu" if name == "cpu" else ("cuda" if name == "cuda" else device))
        lines.append(f"{name:8} {'yes' if compiled_why is None else 'no':9} {'yes' if why is None else 'no':11} {why or ''}")
    return lines + [""] + autotune_report(device)


def autotune_report(device):
    """Lines: what auto measures, where the cache is, and its choices and excluded backends for `device`."""
    tuned = " and ".join(f"{t.upper()} tensors" for t in autotune.TUNED) or "nothing (static table)"
    lines = [f"autotune: measures for {tuned} (BITFAST_AUTOTUNE: 1 = CUDA, all = CUDA and CPU, 0 = off)"]
    path, entries = autotune.cached(device)
    if not entries:
        return lines + [f"no cached choices for {device} in {path} (python -m bitfast --tune measures them all)"]
    return lines + [f"cached choices for {device}: {path}"] + autotune.table(entries)


def info():
    """Print versions and backend availability (also: python -m bitfast)."""
    print("\n".join(report()))
