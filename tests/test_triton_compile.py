"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 with the real compiler, without a GPU.

The interpreter runs the kernels in the other tests; it accepts code the compiler rejects. The check runs in a
subprocess (triton must be imported there without TRITON_INTERPRET) for both archs at once; see
tests/triton_compile_check.py. On a GPU machine the kernels run for real in the other tests, so this is skipped.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("triton_compile_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the Triton tests compile and run for real")
def test_triton_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, str(SCRIPT), str(arch)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for arch in (80, 90)}
    for arch, p in procs.items():
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, f"sm_{arch} compile check failed (exit {p.returncode}):\n{out[-6000:]}"
        assert f"sm_{arch}: 13 kernels compiled" in out, out[-2000:]
