"""bench/gpu_check.sh --oneshot is the one prepared call a lent GPU gets: its logic is checked here with --dry, which
runs every stage on the CPU with the GPU parts skipped or shrunk, and writes the same summary and archive."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def dry(out, *stages, **env):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", **env}
    p = subprocess.run(["bash", str(SCRIPT), "--dry", str(out), *stages], env=env, capture_output=True, text=True,
                       timeout=400)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return p, summary


def test_limits_fit_the_oneshot_budget():
    """The fixed limits leave room inside the 540 s (9 of the device call's 10 minutes)."""
    text = SCRIPT.read_text()
    limits = dict(re.findall(r"\[([\w-]+)\]=(\d+)", text[text.index("declare -A LIMITS"):]))
    oneshot = int(re.search(r"ONESHOT_S=\$\{ONESHOT_S:-(\d+)\}", text).group(1))
    default = re.search(r'STAGES=\$\{\*:-([^}]+)\}', text).group(1).split()
    assert oneshot <= 540 and "scaling" not in default
    assert sum(int(limits[s]) for s in default) <= oneshot, limits


def test_dry_run_writes_summary_and_archive_of_every_stage(tmp_path):
    p, summary = dry(tmp_path, "build", "test", "sanitize", "transfer", "report")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [s["stage"] for s in summary["stages"]] == ["build", "test", "sanitize", "transfer", "report"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in summary["stages"]) and summary["failed"] == []
    assert summary["env"]["mode"] == "dry" and summary["env"]["torch"] and "triton" in summary["env"]
    # The device tool returns at most 8 files, 2 folders down: three files at the top, the rest archived.
    assert {f.name for f in tmp_path.iterdir() if f.is_file()} <= {"summary.json", "log.txt", "results.tar.gz",
                                                                   "env.json", "stages.jsonl"}
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "run/REPORT.md" in names and "run/transfer/metrics.jsonl" in names
    assert not [n for n in names if n.endswith(".pt") or "/folder/" in n]  # no checkpoints, no images
    log = (tmp_path / "log.txt").read_text()
    assert "collected" in log or "selected" in log  # the GPU test selection is collected on the CPU
    assert "0 failures" in log  # sanitize_kernels.py on the CPU backend


def test_a_stage_over_its_limit_is_cut_and_the_rest_still_runs(tmp_path):
    """The planted fault: a 1 s limit on the sanitize stage (about 7 s here)."""
    p, summary = dry(tmp_path, "sanitize", "report", GPU_CHECK_LIMITS="sanitize=1")
    assert p.returncode == 1
    by = {s["stage"]: s for s in summary["stages"]}
    assert by["sanitize"]["timed_out"] and by["sanitize"]["rc"] == 124 and summary["failed"] == ["sanitize"]
    assert by["report"]["rc"] == 0 and (tmp_path / "results.tar.gz").exists()


def test_the_deadline_skips_what_does_not_fit(tmp_path):
    """models-compile only gets what is left after the report's 15 s, and needs 30 s: at 44 s in all it never fits."""
    p, summary = dry(tmp_path, "models-compile", "report", ONESHOT_S="44")
    by = {s["stage"]: s for s in summary["stages"]}
    assert by["models-compile"]["skipped"] and by["models-compile"]["rc"] is None
    assert by["report"]["rc"] == 0 and p.returncode == 0


@pytest.mark.parametrize("args", [["--dry", "OUT", "no-such-stage"]])
def test_unknown_stage_is_refused(tmp_path, args):
    args = [str(tmp_path) if a == "OUT" else a for a in args]
    p = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 2 and "unknown stage: no-such-stage" in p.stdout
