"""The training loop: one function, `train(cfg)`, for transfer and upstream, one process or many (torchrun).

Per optimizer step s (0-based = steps already done):
    lr = lr_at(s); this rank's slice of the global batch -> `rank_split` micro-batches (DDP syncs on the last);
    loss = sum over micro-batches of CE(micro) / rank_batch (so the gradient equals the full batch's);
    one all-reduce of [loss, n, non-finite, stop] -> NaN/inf: checkpoint + NonFiniteLoss; else SGD step.
Randomness is a function of (seed, step, position): data order and crops (data.StreamSampler), the MixUp lambda
(one per global step, same on every rank) and pairing (a permutation per rank). A checkpoint at step s therefore
resumes to the same weights, bit for bit on CPU fp32 with the same world size.
"""
import contextlib
import dataclasses
import math
import os
import signal
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from bitfast.train import checkpoint as ck
from bitfast.train import config as C
from bitfast.train import data as D
from bitfast.train import dist, regularize, report
from bitfast.train.hyperrule import lr_at


NonFiniteLoss = ck.NonFiniteLoss  # raised by the NaN guard in train_step and by ck.save_run


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop stops at the next consistent point (the end of a step, or between
    eval batches), checkpoints and returns. A watchdog bounds the wait: `timeout` s after the signal the process
    exits with 128 + signal even inside a long step or write, leaving the last checkpoint on disk (all writes
    are atomic). It hears of the signal through signal.set_wakeup_fd, which the C-level handler writes at once,
    while the Python handler runs only after the torch op the main thread is in. A second SIGINT raises
    KeyboardInterrupt at once."""

    def __init__(self, timeout=20.0):
        self.signum, self.timeout, self._prev, self._pipe = None, timeout, {}, None
        self._done = threading.Event()

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in (signal.SIGTERM, signal.SIGINT):
            self._prev[s] = signal.signal(s, self._handle)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe, self._old_fd = (r, w), signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._watchdog = threading.Thread(target=self._watch, args=(r,), daemon=True, name="bitfast-stop")
        self._watchdog.start()
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def _watch(self, r):
        sig = None
        while sig is None:  # other signals with Python handlers (SIGCHLD of DataLoader workers) come here too
            data = os.read(r, 64)
            if not data:  # the pipe was closed: the run is over
                return
            sig = next((b for b in data if b in (signal.SIGTERM, signal.SIGINT)), None)
        if self._done.wait(self.timeout):
            return
        os.write(2, f"\nbitfast-train: still running {self.timeout:g} s after {signal.Signals(sig).name}; exiting "
                    "now without a new checkpoint (the last one on disk is kept)\n".encode())
        os._exit(128 + sig)

    def __exit__(self, *exc):
        self._done.set()
        for s, h in self._prev.items():
            signal.signal(s, h)
        if self._pipe:
            signal.set_wakeup_fd(self._old_fd)
            os.close(self._pipe[1])  # the watchdog reads EOF and ends
            self._watchdog.join(1)
            os.close(self._pipe[0])


def build_model(cfg, num_classes, head_bias=0.0):
    from bitfast import models
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise ValueError(f"--weights {cfg.weights}: " + ("is a directory, not a weights file"
                                                         if os.path.isdir(cfg.weights) else "no such file"))
    torch.manual_seed(cfg.seed)
    try:
        model = models.create(cfg.model, num_classes=num_classes, weights=cfg.weights, norm=cfg.norm,
                              conv=cfg.conv, zero_head=cfg.mode == "transfer")
    except ValueError as e:
        raise ValueError(f"--weights: {e}" if cfg.weights and str(cfg.weights) in str(e) else str(e)) from None
    if cfg.weights and not ck.finite(model.state_dict().values()):
        raise ValueError(f"--weights {cfg.weights}: the weights hold nan or inf values")
    if cfg.mode == "transfer" and cfg.weights:
        model.reset_head(num_classes, zero=True)  # BiT transfer always starts from a new zero head
    if head_bias and not cfg.weights and getattr(model, "head", None) is not None:
        with torch.no_grad():  # sigmoid: every class starts near p = sigmoid(-10), not 0.5 (big_vision)
            model.head.fc.bias.fill_(head_bias)
    return model


def param_groups(model, weight_decay, wd_on):
    """SGD parameter groups: one group with `weight_decay`, or (wd_on="kernels") decay on conv kernels (ndim > 1:
    the stem, every block conv and the head's 1x1 conv) and none on GroupNorm scales/biases and the head bias."""
    params = [p for p in model.parameters() if p.requires_grad]
    if wd_on == "all" or not weight_decay:
        return [dict(params=params, weight_decay=weight_decay)]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]


def to_input(x, device, channels_last):  # uint8 (N, 3, H, W) -> float32 in [-1, 1]
    x = x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)  # a no-op move when already there
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def mixup_lambda(seed, step, alpha):
    """One lambda per global batch: a function of (seed, step) only, so every rank draws the same one."""
    return 1.0 if alpha <= 0 else float(np.random.default_rng([seed, step, 0x41]).beta(alpha, alpha))


def mixup_perm(seed, step, rank, n):
    """MixUp partners: a permutation of this rank's batch, a function of (seed, step, rank)."""
    s = int(np.random.SeedSequence([seed, step, rank, 0x9E]).generate_state(1, np.uint64)[0]) >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(s))


def multi_hot(y, k):
    """(N,) class indices or (N, L) lists padded with -1 -> (N, K) float 0/1."""
    y = y[:, None] if y.dim() == 1 else y
    out = torch.zeros(len(y), k + 1, device=y.device)
    return out.scatter_(1, torch.where(y < 0, k, y), 1.0)[:, :k]


def loss_sum(logits, y, kind):  # (N, K), (N,) or (N, L) multi-label -> summed loss, fp32
    logits = logits.float()
    if kind == "sigmoid":  # summed over classes, as big_vision's sigmoid_xent
        return F.binary_cross_entropy_with_logits(logits, multi_hot(y, logits.shape[1]), reduction="sum")
    if y.dim() == 2:  # multi-label data with softmax: the target mass split evenly over the sample's labels
        t = multi_hot(y, logits.shape[1])
        return -(t / t.sum(1, keepdim=True).clamp_min(1) * F.log_softmax(logits, 1)).sum()
    return F.cross_entropy(logits, y, reduction="sum")


def forward_backward(S, x, y, step):
    """Accumulate the gradient of the mean loss over this rank's batch; returns (loss_sum, n)."""
    cfg, r, dev = S.cfg, S.recipe, S.world.device
    weight = 1.0
    if x is None:  # every image of this slice was unreadable: a zero-weight pass keeps DDP in step
        x, y, weight = torch.zeros(1, 3, r.crop, r.crop, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), 0.0
    n, x, y = len(y), x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)  # uint8: a cheap copy
    lam = mixup_lambda(cfg.seed, step, r.mixup)
    perm = mixup_perm(cfg.seed, step, S.world.rank, n).to(dev) if lam < 1.0 else None
    chunks = torch.arange(n, device=dev).tensor_split(min(r.rank_split, n))
    total = torch.zeros((), device=dev)
    for i, idx in enumerate(chunks):
        sync = not S.world.distributed or i == len(chunks) - 1
        with contextlib.nullcontext() if sync else S.ddp.no_sync():
            xi = to_input(x[idx], dev, cfg.channels_last)
            if perm is not None:  # MixUp: pairs by permutation, same lambda for every micro-batch
                xi = lam * xi + (1 - lam) * to_input(x[perm[idx]], dev, cfg.channels_last)
            with S.autocast():
                logits = S.fwd(xi)
            loss = loss_sum(logits, y[idx], cfg.loss)
            if perm is not None:
                loss = lam * loss + (1 - lam) * loss_sum(logits, y[perm[idx]], cfg.loss)
            loss = loss * (weight / n)
            (S.scaler.scale(loss) if S.scaler else loss).backward()
        total += loss.detach()
    return float(total) * n, n * weight


@torch.no_grad()
def evaluate(S):
    """Top-1/top-5/loss over the whole eval set; each rank takes items r, r+W, ... (exact, no padding).
    None when a stop signal arrived (checked between batches); ValueError when no eval image could be read."""
    S.model.eval()
    batches = D.eval_batches(len(S.eval_src), 2 * S.recipe.micro_batch, S.world.rank, S.world.size)
    k = min(5, S.recipe.num_classes)
    c1 = c5 = tot = n = stopped = 0.0
    stop, seen_bad = getattr(S, "stop", None), []
    for x, y, bad in D.loader(D.View(S.eval_src, S.recipe), batches, S.workers, S.pin):
        if stop is not None and stop.signum is not None:  # the weights are saved; the eval is redone on resume
            stopped = 1.0
            break
        S.bad.update(bad)
        seen_bad += bad
        if x is None:
            continue
        y = y.to(S.world.device)
        with S.autocast():
            logits = S.model(to_input(x, S.world.device, S.cfg.channels_last)).float()
        top = logits.topk(k, dim=1).indices
        hit = multi_hot(y, logits.shape[1]).gather(1, top) > 0  # multi-label: a hit is any of the labels
        c1 += float(hit[:, 0].sum())
        c5 += float(hit.any(1).sum())
        tot += float(loss_sum(logits, y, S.cfg.loss))
        n += len(y)
    c1, c5, tot, n, stopped = dist.all_sum(S.world, [c1, c5, tot, n, stopped])
    S.model.train()
    if stopped:
        return None
    if n == 0 and len(S.eval_src):
        raise ValueError(f"eval: none of the {len(S.eval_src):,} eval images of {S.eval_src.name} could be read"
                         + (f" (e.g. {seen_bad[0]})" if seen_bad else ""))
    return dict(top1=c1 / max(n, 1), top5=c5 / max(n, 1), loss=tot / max(n, 1), images=int(n))


def setup(cfg, world, model=None):
    S = type("Run", (), {})()  # a plain bag of run state; cleared at the end so DDP dies before the group
    S.cfg, S.world, S.bad, S.images, S.wall_before, S.images_before = cfg, world, set(), 0, 0.0, 0
    S.log = print if world.main else (lambda *a, **k: None)
    from bitfast.train import shards
    sharded = shards.is_shard_spec(cfg.data) and not os.path.isdir(cfg.data)
    if not world.main:  # rank 0 lists the folder / scans the shards once and caches the index in the run directory
        dist.barrier(world)
    train_src, S.eval_src = D.open_data(cfg.data, cfg.eval_split, cfg.exclude,
                                        cfg.minival if cfg.mode == "upstream" else 0, cfg.out, world.main)
    if world.main:
        dist.barrier(world)
    if sharded and cfg.examples_per_class:
        raise ValueError("--examples-per-class: not supported for shard data (use an ImageFolder)")
    S.indices = D.fewshot_indices(train_src.labels, cfg.examples_per_class,
                                  cfg.seed if cfg.fewshot_seed is None else cfg.fewshot_seed)
    S.recipe = C.resolve(cfg, len(S.indices), train_src.image_hw(), len(train_src.classes), world.size)
    S.train_src = train_src
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    S.workers = cfg.workers if cfg.workers is not None else (
        0 if train_src.in_memory else min(8, max(1, (os.cpu_count() or 1) // local_world)))
    S.pin = world.device.type == "cuda"
    # Shards: the stream depends on the world size and the worker count (shards.ShardSampler); resume checks them.
    S.stream = dict(world=world.size, lanes=max(1, S.workers)) if sharded else None
    S.model = (model if model is not None else build_model(cfg, S.recipe.num_classes, S.recipe.head_bias)
               ).to(world.device)
    if cfg.channels_last:
        S.model = S.model.to(memory_format=torch.channels_last)
    regularize.add_prelogit_dropout(S.model, cfg.dropout)
    S.decay = regularize.DecayToInit(S.model, cfg.weight_decay_init) if cfg.weight_decay_init else None
    if cfg.precision == "fp16" and world.device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device; use bf16 on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    S.autocast = (lambda: torch.autocast(world.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    S.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    S.ddp = S.model
    if world.distributed:
        S.ddp = torch.nn.parallel.DistributedDataParallel(
            S.model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    S.fwd = torch.compile(S.ddp) if cfg.compile else S.ddp
    S.opt = torch.optim.SGD(param_groups(S.model, S.recipe.weight_decay, S.recipe.wd_on), lr=S.recipe.lr, momentum=0.9)
    return S


def train(cfg, model=None):
    """Run `cfg` to the end (or to a stop); returns the summary dict. `model` overrides the zoo model (tests)."""
    cfg = C.validate(cfg)
    world = dist.init(cfg.device)
    S, lock = None, None
    try:
        backend = contextlib.nullcontext()
        if cfg.backend:
            import bitfast
            check_backend(cfg.backend, world.device.type)
            backend = bitfast.use_backend(cfg.backend)
        if world.main:  # before anything reads or writes the run directory
            lock = ck.lock_run_dir(cfg.out)
        with backend, StopSignal(cfg.stop_timeout) as stop:
            S = setup(cfg, world, model)
            return _run(S, stop)
    finally:
        if S is not None:
            S.__dict__.clear()
        if lock is not None:
            os.close(lock)
        dist.shutdown(world)


def check_backend(name, device_type):
    """A --backend that cannot run here fails now with one line, not at the first op with a long traceback."""
    from bitfast import _backend
    if name == "auto":
        return
    why = _backend.usable_why(name, device_type) if name in _backend.BACKENDS else f"not one of {_backend.BACKENDS}"
    if why:
        raise ValueError(f"--backend {name}: {why}")


def _run(S, stop):
    cfg, r, world = S.cfg, S.recipe, S.world
    S.stop, S.saved_step, S.window, S.last_save, S.time_due = stop, None, None, time.time(), False
    start = ck.resume_run(S)
    if world.main:
        S.log(C.describe(r))
        S.log(f"data: {S.train_src.name} ({len(S.indices):,} used) -> eval {S.eval_src.name} ({len(S.eval_src):,}); "
              f"device {world.device}, world {world.size}, model {cfg.model} "
              f"({sum(p.numel() for p in S.model.parameters()) / 1e6:.2f}M params, "
              f"{'weights ' + cfg.weights if cfg.weights else 'from scratch'})")
        if getattr(S.eval_src, "empty", None):
            S.log(f"warning: eval class folder(s) without images: {', '.join(S.eval_src.empty[:5])}")
        ck.write_json(os.path.join(cfg.out, "config.json"),
                      {"config": dataclasses.asdict(cfg), "recipe": dataclasses.asdict(r)})
    metrics = report.Metrics(cfg.out, start) if world.main else None
    total, end_this_run = r.steps, r.steps if cfg.stop_after is None else min(r.steps, start + cfg.stop_after)
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, total // 5)
    ckpt_every = cfg.ckpt_every if cfg.ckpt_every is not None else max(1, math.ceil(total / 10))
    eval_due = lambda s: s < total and eval_every and s % eval_every == 0  # noqa: E731
    S.fewshot = None
    if cfg.mode == "upstream" and cfg.fewshot_data and world.main:  # rank 0 scores it; the others wait
        from bitfast.train.fewshot import FewShot
        S.fewshot = FewShot(cfg.fewshot_data, C.parse_shots(cfg.fewshot_shots), r.crop, cfg.seed)
    fs_due = lambda s: (cfg.fewshot_data and cfg.mode == "upstream" and s < total and cfg.fewshot_every  # noqa: E731
                        and s % cfg.fewshot_every == 0)
    if S.stream:
        from bitfast.train.shards import ShardSampler
        sampler = ShardSampler(S.train_src, r.batch, world.rank, world.size, S.stream["lanes"], cfg.seed, start,
                               end_this_run)
    else:
        sampler = D.StreamSampler(S.indices, r.batch, world.rank, world.size, cfg.seed, start, end_this_run)
    S.progress = progress = report.Progress(metrics, total, start, cfg.log_every, cfg.mode, bar=cfg.progress)
    progress.restore(S.window)
    S.t_start, other, step = time.time(), 0.0, start  # other: time spent in eval and checkpoints
    # The checkpoint at `start` was written before its eval (if one was due), which a kill may have cut short.
    if start and (eval_due(start) or fs_due(start)) and not _eval(S, metrics, start, eval_due(start), fs_due(start)):
        return _stopped(S, start)
    other = time.time() - S.t_start
    for x, y, bad in D.loader(D.View(S.train_src, r, upstream=cfg.mode == "upstream"), sampler, S.workers, S.pin):
        lr = lr_at(step, r.supports, r.lr)
        loss, n, stopping = train_step(S, x, y, step, lr, stop)
        step += 1
        progress.update(step, loss, n, lr, force=step == total)
        for b in bad:
            if b not in S.bad:  # once per file, however often it is sampled
                progress.warn(f"warning: skipped unreadable image {b}")
        S.bad.update(bad)
        t0 = time.time()
        if stopping or step == end_this_run or step % ckpt_every == 0 or S.time_due:
            ck.save_run(S, step)
        if not stopping and (eval_due(step) or fs_due(step)):
            stopping = not _eval(S, metrics, step, eval_due(step), fs_due(step))
            progress.restart_timer()
        if stopping:
            return _stopped(S, step)
        other += time.time() - t0
    train_time = time.time() - S.t_start - other
    progress.close()
    if step < total:
        S.log(f"stopped after {step - start} steps (stop_after); checkpoint saved in {cfg.out}")
        return dict(stopped="stop_after", step=step)
    summary = finish(S, metrics, start, train_time)
    return summary if stop.signum is None else dict(summary, stopped=signal.Signals(stop.signum).name)


def _eval(S, metrics, step, ev=True, fs=False):
    """The periodic eval (and few-shot eval) at `step`; False when a stop signal cut it short."""
    ev = evaluate(S) if ev else {}
    if ev is not None and fs:
        _fewshot(S, metrics, step)
    if ev and S.world.main:
        metrics.write("eval", step, **ev)
    return ev is not None


def _fewshot(S, metrics, step):
    """Few-shot linear eval of the pre-logits (rank 0; the other ranks wait at the barrier)."""
    if S.fewshot is not None:
        acc = S.fewshot.evaluate(S.model, S.world.device)
        metrics.write("fewshot", step, **{f"{k}shot": v for k, v in acc.items()})
        S.progress.warn(f"few-shot {S.cfg.fewshot_data} at step {step}: "
                        + ", ".join(f"{k}-shot {v:.1%}" for k, v in acc.items()))
        S.fewshot_last = acc
    dist.barrier(S.world)


def _stopped(S, step):
    """Stop on a signal: checkpoint the finished `step` (unless it is on disk already) and say how to go on."""
    if S.saved_step != step:
        ck.save_run(S, step)
    S.progress.close()
    why = signal.Signals(S.stop.signum).name if S.stop.signum else "a signal on another rank"
    S.log(f"\nstopped by {why} at step {step}; checkpoint saved in {S.cfg.out}; run the same command to resume")
    return dict(stopped=why, step=step)


def train_step(S, x, y, step, lr, stop):
    """One optimizer step at `lr`; returns (global loss sum, global images, stop requested on any rank)."""
    for g in S.opt.param_groups:
        g["lr"] = lr
    loss, n = forward_backward(S, x, y, step)
    # fp16: the scaler itself skips steps with inf/nan gradients. DDP has averaged the gradients: all ranks agree.
    finite = math.isfinite(loss) and (S.scaler is not None or ck.finite(p.grad for p in S.model.parameters()))
    minutes = S.cfg.ckpt_minutes  # rank 0's clock decides, so every rank saves at the same step
    due = S.world.main and minutes is not None and time.time() - S.last_save >= 60 * minutes
    loss, n, nonfinite, stopping, due = dist.all_sum(S.world, [loss if finite else 0.0, n, float(not finite),
                                                               float(stop.signum is not None), float(due)])
    S.time_due = bool(due)
    if nonfinite:  # before the update: the weights are still finite, so they are the last good checkpoint
        ck.save_run(S, step)
        raise NonFiniteLoss(f"loss or gradients not finite (nan/inf) at step {step} (lr {lr:.3g}); stopped without "
                            f"applying them. Last good checkpoint: {os.path.join(S.cfg.out, 'last.pt')} (step {step})."
                            " Try a lower --lr, --precision fp32, or check the data.")
    if S.decay:  # towards the initial weights, in unscaled gradient units
        if S.scaler:
            S.scaler.unscale_(S.opt)
        S.decay.apply()
    if S.scaler:
        S.scaler.step(S.opt)
        S.scaler.update()
    else:
        S.opt.step()
    S.opt.zero_grad(set_to_none=True)
    if not ck.finite(S.model.parameters()):  # finite gradients can still overflow the weights (a huge lr)
        last = (f"Last good checkpoint: {os.path.join(S.cfg.out, 'last.pt')} (step {S.saved_step})"
                if S.saved_step is not None else "No checkpoint had been written yet")
        raise NonFiniteLoss(f"the update of step {step} (lr {lr:.3g}) made the weights non-finite (nan/inf); stopped, "
                            f"and nothing non-finite was saved. {last}. Try a lower --lr.")
    S.images += int(n)
    return loss, n, bool(stopping)


def finish(S, metrics, start, train_time):
    ev = evaluate(S)
    if ev is None:  # a signal during the final eval; last.pt holds the finished run, a rerun redoes this
        return _stopped(S, S.recipe.steps)
    bad = sorted(set().union(*dist.all_gather_objects(S.world, S.bad)))
    if S.world.main:
        metrics.write("eval", S.recipe.steps, final=True, **ev)
    if S.cfg.mode == "upstream" and S.cfg.fewshot_data:
        _fewshot(S, metrics, S.recipe.steps)
    if not S.world.main:
        return dict(ev, step=S.recipe.steps)
    fewshot = {"fewshot": {str(k): v for k, v in S.fewshot_last.items()}} if S.fewshot is not None else {}
    metrics.close()
    from bitfast import models
    saved = ["last.pt", "metrics.jsonl", "summary.json"]
    if hasattr(S.model, "config"):  # a zoo model: loadable with bitfast.models.load or --weights
        ck.atomic_write(os.path.join(S.cfg.out, "model.pt"), lambda f: models.save(S.model, f))
        saved.insert(0, "model.pt")
    wall = S.wall_before + time.time() - S.t_start
    trained = S.recipe.steps - start
    summary = dict(top1=ev["top1"], top5=ev["top5"], eval_loss=ev["loss"], eval_images=ev["images"],
                   num_classes=S.recipe.num_classes,
                   steps=S.recipe.steps, wall_s=wall, img_per_s=S.images / train_time if trained else 0.0,
                   skipped_images=bad, out=S.cfg.out, **fewshot)
    ck.write_json(os.path.join(S.cfg.out, "summary.json"), summary)
    png, why = report.plot(metrics.path, os.path.join(S.cfg.out, "plot.png"), f"{S.cfg.model} {S.cfg.mode}")
    S.log(report.summary_text(summary))
    S.log(f"outputs in {S.cfg.out}: {', '.join(saved + (['plot.png'] if png else []))}")
    if why:
        S.log(why)
    return summary
