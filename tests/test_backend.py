"""Backend choice rules, missing-backend errors, info(), and opcheck/compile for both ops on every usable backend."""
import subprocess
import sys
import warnings

import pytest
import torch
from torch.library import opcheck

import bitfast
from bitfast import _backend

CPU_USABLE = [b for b in bitfast.BACKENDS if _backend.usable_why(b, "cpu") is None]


def test_torch_and_cpu_backends_usable_here():
    assert _backend.usable_why("torch", "cpu") is None
    assert _backend.usable_why("cpu", "cpu") is None, _backend.usable_why("cpu", "cpu")


def test_explicit_beats_context_beats_auto(monkeypatch):
    assert _backend.resolve("group_norm", None, "cpu") == "cpu"  # auto on CPU tensors
    with bitfast.use_backend("torch"):
        assert _backend.resolve("group_norm", None, "cpu") == "torch"
        assert _backend.resolve("group_norm", "cpu", "cpu") == "cpu"
        with bitfast.use_backend("cpu"):
            assert _backend.resolve("group_norm", None, "cpu") == "cpu"
        assert bitfast.current_backend() == "torch"
    assert bitfast.current_backend() is None or bitfast.current_backend() == _backend._env


def test_context_restores_after_exception():
    before = bitfast.current_backend()
    with pytest.raises(KeyError):
        with bitfast.use_backend("torch"):
            raise KeyError
    assert bitfast.current_backend() == before


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend"):
        bitfast.ops.group_norm(torch.randn(2, 4), 2, backend="tpu")
    with pytest.raises(ValueError, match="use_backend"):
        with bitfast.use_backend("fast"):
            pass


def test_env_var_sets_default():
    code = "import bitfast, torch; from bitfast import _backend; print(_backend.resolve('group_norm', None, 'cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env={**_env(), "BITFAST_BACKEND": "torch"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "torch"
    bad = subprocess.run([sys.executable, "-c", "import bitfast"], env={**_env(), "BITFAST_BACKEND": "gpu"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "BITFAST_BACKEND" in bad.stderr


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "BITFAST_BACKEND"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_missing_cuda_backend_says_why():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(bitfast.BackendUnavailable, match="cuda.*(no CUDA GPU|not compiled)"):
        bitfast.ops.group_norm(x, 2, backend="cuda")
    with pytest.raises(bitfast.BackendUnavailable, match="cuda"):
        bitfast.ops.weight_standardize(torch.randn(4, 2, 3, 3), backend="cuda")


def test_missing_compiled_backend_says_not_compiled(monkeypatch):
    why = "not compiled: bitfast._C failed to import (test)"
    monkeypatch.setitem(_backend._COMPILED, "cpu", why)
    with pytest.raises(bitfast.BackendUnavailable, match="not compiled"):
        bitfast.ops.group_norm(torch.randn(2, 4), 2, backend="cpu")


def test_missing_triton_says_absent(monkeypatch):
    monkeypatch.setattr(_backend, "_TRITON_WHY", "Triton is not installed (test)")
    with pytest.raises(bitfast.BackendUnavailable, match="Triton is not installed"):
        bitfast.ops.group_norm(torch.randn(2, 4), 2, backend="triton")


def test_auto_fallback_warns_once(monkeypatch):
    monkeypatch.setitem(_backend._COMPILED, "cpu", "not compiled (test)")
    monkeypatch.setattr(_backend, "_WARNED", set())
    with pytest.warns(UserWarning, match="falls back to the slow pure-torch backend"):
        assert _backend.resolve("group_norm", None, "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("group_norm", None, "cpu") == "torch"


def test_info_reports_backends():
    out = subprocess.run([sys.executable, "-m", "bitfast"], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.split()[:1] in
            (["torch"], ["cpu"], ["cuda"], ["triton"]) and len(line.split()) >= 3}
    assert rows["torch"] == ["yes", "yes"] and rows["cpu"] == ["yes", "yes"]
    assert "torch " in out and "triton " in out and "bitfast " in out
    if bitfast._C.with_cuda and not torch.cuda.is_available():
        assert rows["cuda"] == ["yes", "no"]  # compiled, but no GPU here


@pytest.mark.parametrize("backend", CPU_USABLE)
def test_opcheck_group_norm(backend):
    x = torch.randn(3, 6, 4, 5, requires_grad=True)
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    opcheck(torch.ops.bitfast.group_norm_fwd.default, (x, w, b, 3, 1e-5, True, backend))
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    opcheck(torch.ops.bitfast.group_norm_fwd.default, (xc, None, None, 2, 1e-5, False, backend))


@pytest.mark.parametrize("backend", CPU_USABLE)
def test_opcheck_weight_standardize(backend):
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    opcheck(torch.ops.bitfast.weight_standardize_fwd.default, (w, 1e-10, None, backend))
    opcheck(torch.ops.bitfast.weight_standardize_fwd.default, (w, 1e-8, torch.float16, backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compile_fullgraph_both_ops(backend):
    torch._dynamo.reset()

    def f(x, w, gw, gb):
        y = bitfast.ops.group_norm(x, 4, gw, gb, act="relu", backend=backend)
        return bitfast.ops.std_conv2d(y, w, padding=1, backend=backend)

    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    gw, gb = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x, w, gw, gb), f(x, w, gw, gb)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.sum(), (x, w, gw, gb))
    g2 = torch.autograd.grad(ref.sum(), (x, w, gw, gb))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
