"""bench/sanitize_kernels.py (the GPU check's compute-sanitizer stage) must not rot while no GPU runs it: the same
calls on the CPU backend, on CPU tensors."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import sanitize_kernels  # noqa: E402


def test_sanitize_script_runs_every_call_on_the_cpu(capsys):
    assert sanitize_kernels.main(["--device", "cpu", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: group_norm") == 15 and out.count("ok: weight_standardize") == 6 and "0 failures" in out
