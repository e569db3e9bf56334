"""What a run leaves behind (rank 0 only): metrics.jsonl, TensorBoard events if available, plot.png, summary."""
import errno
import json
import os
import sys
import time

from bitfast.train.checkpoint import atomic_write


class Metrics:
    """Appends one JSON object per line, each row in one write() on an O_APPEND file. On resume from step s it
    keeps the rows a run writes before its checkpoint at s: everything before s and the train row at s. Evals
    at s (and later) are redone by the resumed run, and a line cut by a kill or a full disk is dropped; the
    file is rewritten atomically, so a kill then loses nothing.

    TensorBoard (<out>/tb, when tensorboard is installed) gets the same numbers, flushed with every row so that a
    kill leaves it as complete as metrics.jsonl. A resumed run's event file starts with purge_step=s, which makes
    TensorBoard drop every earlier event at step >= s (those of the evals it redoes, and any a kill left after
    the checkpoint), so it then writes the kept train row at s again: one value per tag and step."""

    def __init__(self, out, resume_step=None, tensorboard=True):
        self.path = os.path.join(out, "metrics.jsonl")
        kept = [] if resume_step is None else [
            r for r in read_metrics(self.path)
            if r.get("step", 0) < resume_step or (r.get("step") == resume_step and r.get("kind") == "train")]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=resume_step)
            except ImportError:
                pass
        for r in kept:
            if self.tb is not None and r.get("step") == resume_step:
                self._scalars(r["kind"], r["step"], r)

    def write(self, kind, step, **values):
        line = (json.dumps({"kind": kind, "step": step, **values}) + "\n").encode()
        try:
            if os.write(self.fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None
        if self.tb is not None:
            self._scalars(kind, step, values)

    def _scalars(self, kind, step, values):
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("kind", "step"):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Rank 0's view of training and the train rows of metrics.jsonl. On a terminal: a tqdm bar (step, loss, lr,
    img/s, ETA). Otherwise (a log file, CI): one plain line at most every `line_every` seconds, since a bar's
    carriage-return redraws would fill the log. On other ranks (metrics=None) every method does nothing."""

    def __init__(self, metrics, total, start, log_every, desc, bar=True, line_every=30.0, tty=None):
        self.metrics, self.every, self.bar, self.lines = metrics, log_every, None, False
        self.total, self.start, self.desc, self.line_every = total, start, desc, line_every
        self.t0, self.last_line, self.loss, self.n = time.time(), None, 0.0, 0.0
        tty = sys.stderr.isatty() if tty is None else tty
        if metrics is not None and bar and tty:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        elif metrics is not None and bar:
            self.lines = True
        self.restart_timer()

    def restart_timer(self):  # after an evaluation or a checkpoint, so img/s counts training only
        self.t, self.timed = time.time(), 0.0

    def window(self):
        """The train-loss window open since the last train row; a checkpoint carries it, so that a resumed
        run writes the same train rows as an uninterrupted one."""
        return {"loss": self.loss, "n": self.n}

    def restore(self, window):
        if window:
            self.loss, self.n = window["loss"], window["n"]

    def update(self, step, loss_sum, n, lr, force=False):
        if self.metrics is None:
            return
        self.loss, self.n, self.timed = self.loss + loss_sum, self.n + n, self.timed + n
        if step % self.every == 0 or force:
            ips, loss = self.timed / max(time.time() - self.t, 1e-9), self.loss / max(self.n, 1)
            self.metrics.write("train", step, loss=loss, lr=lr, img_s=ips)
            if self.bar:
                self.bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr:.2g}", "img/s": f"{ips:.0f}"}, refresh=False)
            elif self.lines:
                self._line(step, loss, lr, ips)
            self.loss, self.n = 0.0, 0.0
            self.restart_timer()
        if self.bar:
            self.bar.update(1)

    def _line(self, step, loss, lr, ips):
        now = time.time()
        if self.last_line is not None and now - self.last_line < self.line_every and step < self.total:
            return
        self.last_line = now
        done = step - self.start
        eta = (now - self.t0) / done * (self.total - step) if done > 0 else float("nan")
        print(f"[{self.desc}] step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2g}  {ips:.0f} img/s  "
              f"eta {_clock(eta)}", flush=True)

    def warn(self, text):
        if self.metrics is not None:
            (self.bar.write if self.bar else print)(text)

    def close(self):
        if self.bar:
            self.bar.close()


def _clock(seconds):
    if seconds != seconds:  # nan: nothing done yet
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def read_metrics(path):
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
    return rows


def plot(metrics_path, png_path, title=""):
    """Loss, lr and accuracy against step. Returns the PNG path, or None (with the reason) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "plot.png skipped: matplotlib is not installed (pip install matplotlib)"
    rows = read_metrics(metrics_path)
    tr = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
    ax[0].plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="eval")
    ax[0].set(title="loss", xlabel="step")
    ax[0].legend()
    ax[1].plot([r["step"] for r in tr], [r["lr"] for r in tr])
    ax[1].set(title="learning rate", xlabel="step")
    ax[2].plot([r["step"] for r in ev], [100 * r["top1"] for r in ev], "o-", label="top-1")
    if any(r["top5"] < 1 for r in ev):  # with 5 classes or fewer top-5 is always 100%
        ax[2].plot([r["step"] for r in ev], [100 * r["top5"] for r in ev], "s--", label="top-5")
    ax[2].set(title="eval accuracy (%)", xlabel="step")
    ax[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return png_path, None


def summary_text(s):
    top5 = f"top-5 {100 * s['top5']:.2f}%" if s["num_classes"] > 5 else f"(top-5: {s['num_classes']} classes)"
    lines = [f"top-1 {100 * s['top1']:.2f}%  {top5}  on {s['eval_images']:,} eval images",
             f"{s['steps']} steps, {s['wall_s']:.1f} s, {s['img_per_s']:.1f} img/s (training)"]
    if s.get("skipped_images"):
        lines.append(f"skipped {len(s['skipped_images'])} unreadable image(s), e.g. {s['skipped_images'][0]}")
    return "\n".join(lines)
