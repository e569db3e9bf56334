"""Issue 14 item 4, runs that last weeks: upstream on shards under torchrun (2 gloo ranks, CPU fp32) ends with the
weights of an uninterrupted run after (1) a worker of one of two elastic agents is killed and torchrun restarts
both agents' workers (--max-restarts), and (2) the launcher gets SIGTERM, checkpoints within the bound, and the
same command is run again.

Every launch runs in its own session with a hard deadline: past it the test kills the process groups and fails
with the tail of each log, so that nothing can hang CI."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bitfast.train import checkpoint as ck
from bitfast.train import loop

try:
    from test_train_loop import cfg_for, tiny
    from test_train_shards import packed, pattern  # noqa: F401 (packed: a fixture)
    from test_train_tensorboard import HAVE_TB, assert_tb_matches_metrics
except ImportError:  # tests/ as a package
    from tests.test_train_loop import cfg_for, tiny
    from tests.test_train_shards import packed, pattern  # noqa: F401
    from tests.test_train_tensorboard import HAVE_TB, assert_tb_matches_metrics

# bitfast-train with one hook: at step PAUSE_AT, rank PAUSE_RANK (the first time only: no paused.* file yet) writes
# <out>/paused.<pid> and waits inside the step until a stop signal comes, so the test kills or stops a run that
# is surely mid-step, with the checkpoint of step 6 on disk (ckpt-every 3).
WORKER = textwrap.dedent("""
    import os, sys, time
    from bitfast.train import cli, loop
    pause, rank, step_fn = int(os.environ.get("PAUSE_AT", "-1")), int(os.environ["PAUSE_RANK"]), loop.train_step
    def train_step(S, x, y, step, lr, stop):
        out = S.cfg.out
        if step == pause and S.world.rank == rank and not any(n.startswith("paused.") for n in os.listdir(out)):
            open(os.path.join(out, f"paused.{os.getpid()}"), "w").close()
            while stop.signum is None:
                time.sleep(0.05)
        return step_fn(S, x, y, step, lr, stop)
    loop.train_step = train_step
    sys.exit(cli.main(sys.argv[1:]))
""")
PAUSE_AT, SAVED = 7, 6
DEADLINE = 240  # seconds per launch; a normal one takes 20-45 s on the 2 shared cores


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Launches:
    """torchrun processes, each in its own session with its log in a file; closing kills what is still alive."""

    def __init__(self, tmp, data):
        self.tmp, self.data, self.procs = tmp, data, []

    def start(self, name, torchrun_args, out, pause=None):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path),
                   PAUSE_AT=str(-1 if pause is None else PAUSE_AT), PAUSE_RANK=str(pause or 0))
        script = self.tmp / "worker.py"
        script.write_text(WORKER)
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(script), "upstream",
               "--model", "bit_tiny", "--data", pattern(self.data), "--batch", "16", "--resolution", "20,16",
               "--steps", "12", "--eval-every", "0", "--ckpt-every", "3", "--workers", "1", "--no-progress",
               "--out", str(out), "log_every=2", "stop_timeout=10"]
        with open(self.tmp / f"{name}.log", "w") as log:
            p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        p.name, p.log, p.t0 = name, self.tmp / f"{name}.log", time.time()
        self.procs.append(p)
        return p

    def logs(self):
        return "\n".join(f"----- {p.name} (rc {p.poll()}):\n{p.log.read_text()[-4000:]}" for p in self.procs)

    def fail(self, why):
        pytest.fail(f"{why}\n{self.logs()}", pytrace=False)

    def wait(self, *procs):
        for p in procs:
            try:
                p.wait(max(1, DEADLINE - (time.time() - p.t0)))
            except subprocess.TimeoutExpired:
                self.fail(f"{p.name} still running after {DEADLINE} s")
        return [p.returncode for p in procs]

    def wait_for(self, folder, prefix, procs):
        """The pid in the name of <folder>/<prefix><pid>, once the file appears."""
        while True:
            names = [n for n in os.listdir(folder) if n.startswith(prefix)] if folder.exists() else []
            if names:
                return int(names[0][len(prefix):])
            if any(p.poll() is not None for p in procs) or time.time() - procs[0].t0 > DEADLINE:
                self.fail(f"no {prefix}* file in {folder}")
            time.sleep(0.1)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def launches(tmp_path, packed):  # noqa: F811
    ls = Launches(tmp_path, packed)
    yield ls
    ls.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, packed):  # noqa: F811
    """The uninterrupted run: 2 ranks on one agent."""
    tmp = tmp_path_factory.mktemp("reference")
    ls = Launches(tmp, packed)
    try:
        if ls.wait(ls.start("reference", ["--standalone", "--nproc_per_node=2"], tmp / "out")) != [0]:
            ls.fail("the uninterrupted run failed")
    finally:
        ls.close()
    return tmp / "out"


def assert_same_run(out, ref):
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (out, ref))
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    rows = [[{k: v for k, v in json.loads(ln).items() if k != "img_s"} for ln in open(os.path.join(d, "metrics.jsonl"))]
            for d in (out, ref)]
    assert rows[0] == rows[1]
    if HAVE_TB:
        assert_tb_matches_metrics(out)


def test_a_killed_worker_of_two_elastic_agents_restarts_and_resumes_to_the_same_weights(launches, reference):
    out, port = launches.tmp / "out", free_port()
    agent = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}",
             "--rdzv_id=elastic-test", "--max-restarts=1"]
    agents = [launches.start(f"agent{i}", agent, out, pause=0) for i in (0, 1)]
    pid = launches.wait_for(out, "paused.", agents)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == SAVED
    os.kill(pid, signal.SIGKILL)  # rank 0's worker (it holds the run's lock and writes the metrics), not its agent
    if launches.wait(*agents) != [0, 0]:
        launches.fail("an agent failed")
    logs = launches.logs()
    assert "exitcode: -9" in logs  # torchelastic saw the kill ...
    assert f"resuming from {out / 'last.pt'} at step {SAVED}" in logs  # ... and the restarted rank 0 resumed
    assert "terminate called" not in logs
    assert_same_run(out, reference)


def test_sigterm_to_torchrun_checkpoints_within_the_bound_and_the_rerun_resumes(launches, reference):
    out, standalone = launches.tmp / "out", ["--standalone", "--nproc_per_node=2"]
    run = launches.start("stopped", standalone, out, pause=1)
    launches.wait_for(out, "paused.", [run])
    t0 = time.time()
    run.send_signal(signal.SIGTERM)  # what Slurm and Kubernetes do: torchrun passes it to its workers
    launches.wait(run)
    took = time.time() - t0
    assert took < 10 + 5, took  # stop_timeout=10, and torchrun's own exit
    assert "stopped by SIGTERM at step 8; checkpoint saved" in run.log.read_text(), launches.logs()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == SAVED + 2  # the paused step 7 ended; 8 saved
    again = launches.start("resumed", standalone, out)
    if launches.wait(again) != [0]:
        launches.fail("the resumed run failed")
    assert f"resuming from {out / 'last.pt'} at step 8" in again.log.read_text()
    assert_same_run(out, reference)


def test_a_restart_waits_for_the_lock_that_a_killed_runs_data_workers_still_hold(tmp_path):
    """A run killed with SIGKILL leaves its forked DataLoader workers holding its flock for a few seconds: the
    lock file names a dead pid of this host, so the next run waits for them instead of failing (a lost restart)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"pid {dead.pid} on {socket.gethostname()}\n")  # what the killed run wrote
    orphan = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(2)",
                               str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline() == "locked\n"
        t0 = time.time()
        os.close(ck.lock_run_dir(str(tmp_path)))
        assert time.time() - t0 > 0.5 and orphan.poll() is not None
    finally:
        orphan.kill()
        orphan.wait()


def test_a_rerun_or_restart_with_resume_goes_on_from_its_own_last_checkpoint(tmp_path, capsys):
    """--resume X starts a run from X; once that run has written <out>/last.pt, the same command (torchrun's
    restart, a rerun) goes on from there, not from X again, and ends as an uninterrupted run."""
    loop.train(cfg_for(tmp_path / "a"), model=tiny())
    loop.train(cfg_for(tmp_path / "x", stop_after=4), model=tiny())
    x = str(tmp_path / "x" / "last.pt")
    assert loop.train(cfg_for(tmp_path / "b", resume=x, stop_after=4), model=tiny())["step"] == 8
    capsys.readouterr()
    loop.train(cfg_for(tmp_path / "b", resume=x), model=tiny())
    assert f"resuming from {tmp_path / 'b' / 'last.pt'} at step 8 (this run started from {x})" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
