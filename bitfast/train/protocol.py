"""What the evaluation protocols (vtab, fewshot_transfer, sweep) share: flags, one resumable run, the seeded
selection split, and small table helpers.

Every training run of a protocol is an ordinary `transfer` run directory (loop.train on a TrainConfig). A run
whose summary.json exists is finished and is read back, not repeated; an unfinished one resumes from its last.pt.
So a protocol killed at any point continues where it stopped when the same command is run again.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np

from bitfast.train import config as C
from bitfast.train import data as D

# TrainConfig fields a protocol may take from its command line.
COMMON = ("model", "weights", "seed", "workers", "device", "precision", "batch_split", "channels_last", "backend",
          "progress")


class Stopped(Exception):
    """A run stopped on SIGTERM/SIGINT; carries the exit code."""

    def __init__(self, result):
        super().__init__(f"stopped by {result['stopped']}")
        self.code = 128 + {"SIGTERM": 15, "SIGINT": 2}.get(result["stopped"], 1)


def is_main():
    return int(os.environ.get("RANK", "0")) == 0


def log(*a):
    if is_main():
        print(*a, flush=True)


def add_common(p):
    a = p.add_argument
    a("--out", required=True, help="protocol directory: one run directory per training run, tables at the top")
    a("--model", help="zoo name (default BiT-M-R50x1)")
    a("--weights", help="pre-trained weights (.npz, timm state_dict or bitfast model.pt)")
    a("--seed", type=int, help="training seed: data order, crops, flips, MixUp (default 0)")
    a("--precision", choices=C.CHOICES["precision"], help="fp32 (default), bf16 or fp16 autocast")
    a("--channels-last", action="store_true", default=None, help="NHWC memory format")
    a("--batch-split", type=int, help="micro-batches per step (memory); the effective batch stays 512")
    a("--backend", help="bitfast kernel backend (default auto)")
    a("--device", help="auto (default), cpu, cuda")
    a("--workers", type=int, help="DataLoader workers per rank")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    a("overrides", nargs="*", metavar="key=value", help="any TrainConfig field for every run (e.g. steps=50)")


def base_config(args, owned, **kw):
    """A transfer TrainConfig from the common flags, `kw` (the protocol's choices) and key=value overrides, which
    win over `kw` except for the keys in `owned`."""
    for item in args.overrides:
        key = item.split("=", 1)[0].strip().lstrip("-").replace("-", "_")
        if key in owned:
            raise ValueError(f"override {item!r}: {key} is set by the {args.command} protocol")
    given = {k: getattr(args, k) for k in COMMON if getattr(args, k, None) is not None}
    return C.make_config("transfer", overrides=args.overrides, **{**given, **kw})


def overridden(args):
    return {item.split("=", 1)[0].strip().lstrip("-").replace("-", "_") for item in args.overrides}


@contextlib.contextmanager
def process_group(device):
    """One torch.distributed group (under torchrun) for all the runs of a protocol; each run joins it."""
    from bitfast.train import dist
    world = dist.init(device or "auto")
    try:
        yield world
    finally:
        dist.shutdown(world)


def grouped(main):
    """main(args) inside process_group(args.device): the entry point a protocol registers."""
    def entry(args):
        with process_group(args.device):
            return main(args)
    return entry


# What decides a finished run's result (a run directory is read back only when these agree).
RESULT_KEYS = ("mode", "model", "weights", "data", "examples_per_class", "seed", "fewshot_seed", "batch", "lr",
               "steps", "resolution", "paper_res", "mixup", "no_flip", "no_crop", "weight_decay", "dropout",
               "weight_decay_init", "eval_split", "exclude", "loss", "norm", "conv", "precision")


def changed(saved, now):
    def canon(k, v):
        return os.path.realpath(v) if k in ("data", "weights", "exclude") and v and os.path.exists(v) else v
    default = {f.name: f.default for f in dataclasses.fields(C.TrainConfig)}
    return [k for k in RESULT_KEYS if canon(k, saved.get(k, default[k])) != canon(k, now[k])]


def run(cfg):
    """Train `cfg` to the end, or read back the summary of its finished run directory."""
    done = os.path.join(cfg.out, "summary.json")
    if os.path.exists(done):
        with open(os.path.join(cfg.out, "config.json")) as f:
            saved = json.load(f)["config"]
        bad = changed(saved, dataclasses.asdict(cfg))
        if bad:
            raise ValueError(f"{cfg.out} holds a finished run with other settings ({', '.join(bad)}); "
                             "use a new --out, or the original settings")
        log(f"   finished before: read back {done}")
        with open(done) as f:
            return json.load(f)
    from bitfast.train.loop import train
    result = train(cfg)
    if "stopped" in result:
        raise Stopped(result)
    return dict(result, eval_images=result.get("eval_images", result.get("images")))  # ranks > 0: eval dict


def selection_split(task_dir, out_dir, seed, val_fraction=0.2):
    """out_dir/{train,val}/<class>/ of symlinks to a seeded split of task_dir/train/ (VTAB-1k: 1000 -> 800/200).

    Built in a private temp folder and renamed into place, so concurrent ranks and a kill mid-way are safe; an
    existing split is reused when its manifest matches (same source listing, seed and fraction)."""
    src = D.FolderSource(os.path.join(task_dir, "train"))
    manifest = dict(source=os.path.abspath(task_dir), seed=seed, val_fraction=val_fraction, images=len(src),
                    listing_sha256=hashlib.sha256("\n".join(src.paths).encode()).hexdigest()[:16])
    path = os.path.join(out_dir, "split.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) == manifest:
                return out_dir
        shutil.rmtree(out_dir)
    n_val = max(1, round(len(src) * val_fraction))
    if n_val >= len(src):
        raise ValueError(f"data: {task_dir}/train has {len(src)} image(s): too few for a train/val split")
    order = np.random.default_rng(seed).permutation(len(src))
    tmp = f"{out_dir}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        for cls in src.classes:  # every class folder on both sides, so the class list stays the same
            os.makedirs(os.path.join(tmp, split, cls), exist_ok=True)
        for i in idx:
            cls = src.classes[src.labels[i]]
            rel = os.path.relpath(src.paths[i], os.path.join(src.root, cls)).replace(os.sep, "__")
            os.symlink(os.path.abspath(src.paths[i]), os.path.join(tmp, split, cls, rel))
    with open(os.path.join(tmp, "split.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another rank got there first with the same split
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def pct(v):
    return "—" if v is None else f"{100 * v:.2f}"


def write_tables(out, name, data, markdown):
    """<out>/<name>.json and <out>/<name>.md, written atomically by rank 0."""
    if not is_main():
        return
    os.makedirs(out, exist_ok=True)
    for ext, text in (("json", json.dumps(data, indent=1)), ("md", markdown)):
        tmp = os.path.join(out, f"{name}.{ext}.tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(out, f"{name}.{ext}"))


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
