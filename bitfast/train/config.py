"""Run configuration: one dataclass, a few presets, key=value overrides, and the resolved recipe.

`TrainConfig` is what the user asked for (None = "let the rule decide"); `resolve()` turns it plus facts
about the data and the world size into a `Recipe` with every value fixed, and a reason for each.
"""
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Optional

from bitfast.train import hyperrule as hr


@dataclass
class TrainConfig:
    mode: str = "transfer"  # "transfer" (BiT-HyperRule) or "upstream" (pre-training recipe)
    model: str = "BiT-M-R50x1"  # a bitfast.models zoo name
    weights: Optional[str] = None  # .npz (official), timm state_dict or native checkpoint; None = from scratch
    data: str = ""  # ImageFolder root (train/ + val/ or test/) or a built-in name, e.g. fashion-mnist:5-9
    out: str = "runs/bitfast"
    examples_per_class: int = 0  # few-shot K per class (0 = all)
    seed: int = 0
    batch: int = hr.BATCH  # global batch, whatever the world size
    batch_split: int = 1  # micro-batches per step on ONE device; per-rank split is derived
    lr: Optional[float] = None
    steps: Optional[int] = None  # stretches the rule's supports to end at this step
    resolution: Optional[str] = None  # "RESIZE,CROP" or "CROP"
    paper_res: bool = False  # (448, 384) instead of the code's (512, 480)
    mixup: Optional[float] = None
    no_flip: bool = False
    no_crop: bool = False
    eval_split: str = "auto"  # "auto": test/ when there is one (the official split), else val/; or "test", "val"
    exclude: Optional[str] = None  # file of image paths to leave out (dedup's list of near-duplicates)
    fewshot_seed: Optional[int] = None  # seed of the few-shot draw (default: seed): vary the draw, keep the rest
    dropout: float = 0.0  # dropout on the pre-logits (random search, paper appendix A); HyperRule: none
    weight_decay_init: float = 0.0  # L2 penalty towards the initial (pre-trained) weights; HyperRule: none
    weight_decay: Optional[float] = None  # transfer: 0; upstream: 1e-4
    schedule: str = "bit-m"  # upstream only: "bit-m" (90 epochs, /10 at 30/60/80) or "bit-l" (40; 10/23/30/37)
    epochs: Optional[float] = None  # upstream only; default: the schedule's (decay epochs scale with it)
    warmup: int = 5000  # upstream only (paper: 5000 steps)
    warmup_cap: str = "decay"  # upstream: cap the warmup only at the first decay; "tenth": at a tenth of the run
    loss: str = "softmax"  # or "sigmoid" (multi-label upstream data, as ImageNet-21k)
    head_bias: Optional[float] = None  # initial head bias; default -10 for sigmoid (big_vision), 0 for softmax
    wd_on: str = "kernels"  # upstream: weight decay on conv kernels only (big_vision) or on "all" parameters
    eval_crop: str = "center"  # upstream eval: short side to RESIZE, central crop (big_vision); "squash" to CROP
    crop_area: float = 0.05  # upstream Inception crop: min area fraction (big_vision 0.05; torchvision 0.08)
    minival: int = 10_000  # upstream data without val/ or test/: hold out this many train images (fixed seed)
    fewshot_data: Optional[str] = None  # upstream: few-shot linear eval on this data (fewshot.py) ...
    fewshot_every: int = 0  # ... every N steps (0: only at the end when fewshot_data is set)
    fewshot_shots: str = "1,5,10,25"
    norm: str = "gn"  # model variants for scratch/ablation runs
    conv: str = "ws"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    backend: Optional[str] = None
    device: str = "auto"
    eval_every: Optional[int] = None  # default: 5 evaluations per run
    ckpt_every: Optional[int] = None  # default: 10 checkpoints per run
    ckpt_minutes: Optional[float] = None  # also checkpoint when this many minutes passed since the last one
    keep_ckpts: int = 0  # also keep the last K checkpoints as ckpt-<step>.pt (hard links; last.pt is the newest)
    log_every: int = 10
    workers: Optional[int] = None  # default: 0 for in-memory data, else min(8, cpus per rank)
    decode: str = "fast"  # image decode/resize path (decode.py): "fast" uint8 tensor resizes, "pil", "gpu" (nvjpeg)
    stop_after: Optional[int] = None  # checkpoint and exit after this many steps in this invocation
    resume: Optional[str] = None  # a checkpoint; default: <out>/last.pt when it exists
    progress: bool = True
    stop_timeout: float = 20.0  # seconds from SIGTERM/SIGINT to exit, checkpoint or not (README: Training)


PRESETS = {
    "transfer": {},
    "upstream": dict(mode="upstream", batch=4096),
    # The demo: HyperRule shape at a CPU scale (1/8 of the batch, 1/5 of the steps, 28px crops).
    # The demo keeps the settings its README numbers were measured with (warmup cap, squash eval, 8% crops, wd on all).
    "demo-upstream": dict(mode="upstream", model="bit_small", data="fashion-mnist-small:0-4", batch=128,
                          epochs=6, warmup=50, resolution="32,28", workers=0, eval_every=0, log_every=5,
                          warmup_cap="tenth", eval_crop="squash", crop_area=0.08, wd_on="all"),
    "demo-transfer": dict(model="bit_small", data="fashion-mnist-small:5-9", examples_per_class=10, batch=64,
                          steps=100, resolution="32,28", workers=0, eval_every=50, log_every=5),
}

CHOICES = dict(mode=("transfer", "upstream"), precision=("fp32", "bf16", "fp16"), loss=("softmax", "sigmoid"),
               norm=("gn", "bn"), conv=("ws", "plain"), schedule=tuple(hr.UPSTREAM_SCHEDULES),
               eval_split=("auto", "test", "val"), warmup_cap=("decay", "tenth"), wd_on=("kernels", "all"),
               eval_crop=("center", "squash"), decode=("pil", "fast", "gpu"))


def _coerce(name, typ, text):
    """Parse `text` as the field's type: str, int, float, bool, or Optional of one of them."""
    args = [t for t in typing.get_args(typ) if t is not type(None)]
    optional = bool(args)
    base = args[0] if args else typ
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return base(text)
    except ValueError:
        raise ValueError(f"override {name}={text!r}: expected {base.__name__}") from None


def apply_overrides(cfg, items):
    """Apply ["key=value", ...] (dashes or underscores in keys) to a TrainConfig, in place."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if key not in fields:
            raise ValueError(f"override {item!r}: unknown key {key!r}; known: {', '.join(sorted(fields))}")
        setattr(cfg, key, _coerce(key, fields[key].type, text.strip()))
    return validate(cfg)


LR_MAX = 1e4  # far above any sensible lr; above ~3e38 SGD cannot even form lr * grad in fp32
MAX_SIDE = 4096  # resize/crop limit: one 4096^2 image is already 48 MiB of uint8 and ~200 MiB as float
SEED_MAX = 2**63 - 1  # torch.manual_seed takes 64-bit seeds


def _flag(k):
    return "--" + k.replace("_", "-")


def _check(cfg, keys, ok, what, optional=False):
    for k in keys:
        v = getattr(cfg, k)
        if not (optional and v is None) and not ok(v):
            raise ValueError(f"{_flag(k)} must be {what}, got {v!r}")


def validate(cfg):
    """Refuse values that would crash later or silently mean something else; each message names the flag."""
    for k, allowed in CHOICES.items():
        if getattr(cfg, k) not in allowed:
            raise ValueError(f"{_flag(k)} must be one of {allowed}, got {getattr(cfg, k)!r}")
    _check(cfg, ("batch", "batch_split", "log_every"), lambda v: v >= 1, ">= 1")
    _check(cfg, ("examples_per_class", "warmup", "minival", "fewshot_every", "keep_ckpts"), lambda v: v >= 0, ">= 0")
    _check(cfg, ("ckpt_minutes",), lambda v: math.isfinite(v) and v > 0, "a finite number of minutes > 0",
           optional=True)
    _check(cfg, ("crop_area",), lambda v: math.isfinite(v) and 0 < v <= 1, "a fraction in (0, 1]")
    _check(cfg, ("head_bias",), math.isfinite, "a finite number", optional=True)
    parse_shots(cfg.fewshot_shots)
    _check(cfg, ("steps", "stop_after", "ckpt_every"), lambda v: v >= 1, ">= 1", optional=True)
    _check(cfg, ("eval_every", "workers"), lambda v: v >= 0, ">= 0", optional=True)
    _check(cfg, ("seed", "fewshot_seed"), lambda v: 0 <= v <= SEED_MAX, "in [0, 2**63)", optional=True)
    # NaN passes every < and > test, so finiteness is checked first.
    _check(cfg, ("mixup", "weight_decay"), lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0",
           optional=True)
    _check(cfg, ("epochs",), lambda v: math.isfinite(v) and v > 0, "a finite number > 0", optional=True)
    _check(cfg, ("lr",), lambda v: math.isfinite(v) and 0 < v <= LR_MAX, f"a finite number in (0, {LR_MAX:g}]",
           optional=True)
    _check(cfg, ("stop_timeout",), lambda v: math.isfinite(v) and v > 0, "a finite number of seconds > 0")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.weight_decay_init < 0:
        raise ValueError(f"weight_decay_init must be >= 0, got {cfg.weight_decay_init}")
    if cfg.resolution is not None:
        parse_resolution(cfg.resolution)
    if cfg.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    return cfg


def parse_resolution(text):
    """'R,C' -> (R, C); 'C' -> (None, C)."""
    parts = str(text).replace("x", ",").split(",")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--resolution must be 'RESIZE,CROP' or 'CROP', got {text!r}") from None
    if len(vals) not in (1, 2) or min(vals) < 1 or (len(vals) == 2 and vals[1] > vals[0]):
        raise ValueError(f"--resolution must be 'RESIZE,CROP' (crop <= resize) or 'CROP', got {text!r}")
    if max(vals) > MAX_SIDE:
        raise ValueError(f"--resolution must be at most {MAX_SIDE} pixels a side, got {text!r}")
    return (None, vals[0]) if len(vals) == 1 else tuple(vals)


def parse_shots(text, flag="--fewshot-shots"):
    """'1,5,10,25' -> [1, 5, 10, 25] (sorted, unique, each >= 1); errors name `flag`."""
    try:
        shots = sorted({int(t) for t in str(text).split(",")})
    except ValueError:
        shots = []
    if not shots or shots[0] < 1:
        raise ValueError(f"{flag} must be a list of K >= 1 like '1,5,10,25', got {text!r}")
    return shots


def make_config(preset="transfer", overrides=(), **kw):
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    cfg = TrainConfig(**{**PRESETS[preset], **kw})
    return apply_overrides(cfg, list(overrides))


@dataclass
class Recipe:
    """Every training value fixed; `why` maps a value's name to the rule (or flag) that chose it."""
    mode: str
    dataset_size: int
    num_classes: int
    resize: int
    crop: int
    flip: bool
    random_crop: bool
    supports: list
    lr: float
    weight_decay: float
    mixup: float
    batch: int  # global
    world_size: int
    rank_batch: int
    rank_split: int  # micro-batches per rank step
    why: dict = field(default_factory=dict)
    # Defaults = what a checkpoint written before these fields existed computed (checkpoint.settings_mismatch).
    loss: str = "softmax"
    head_bias: float = 0.0  # the head's initial bias (a model built here from scratch)
    wd_on: str = "all"  # "all" parameters or conv "kernels" only
    eval_crop: str = "squash"  # "squash": resize to (crop, crop); "center": short side to resize, central crop
    crop_area: float = 0.08  # Inception crop's minimum area fraction (upstream)
    decode: str = "fast"  # how workers decode and resize (decode.py); not a resume setting: same crops and draws

    @property
    def steps(self):
        return self.supports[-1]

    @property
    def micro_batch(self):
        return self.rank_batch // self.rank_split


def _split_for_rank(batch, batch_split, world):
    """Per-rank batch and micro-batch count keeping the one-device micro-batch size (or smaller)."""
    if batch % world:
        raise ValueError(f"batch={batch} must be divisible by the world size {world}")
    rank_batch = batch // world
    micro = max(1, batch // batch_split)  # what fits in one device's memory
    split = next(d for d in range(1, rank_batch + 1) if rank_batch % d == 0 and rank_batch // d <= micro)
    return rank_batch, split


def resolve(cfg, dataset_size, image_hw, num_classes, world_size=1):
    """The Recipe for this config, data (size after few-shot, typical (H, W)) and world size."""
    why = {}
    # Resolution.
    (r_rule, c_rule), why_res = hr.resolution(image_hw, paper=cfg.paper_res)
    if cfg.mode == "upstream":
        (r_rule, c_rule), why_res = (256, 224), "upstream recipe: Inception crop 224 (+flip); eval at 256/224"
    if cfg.resolution is None:
        resize, crop, why["resolution"] = r_rule, c_rule, why_res
    else:
        resize, crop = parse_resolution(cfg.resolution)
        if resize is None:
            resize = round(crop * r_rule / c_rule)
        why["resolution"] = f"--resolution {cfg.resolution}"
    # Schedule and lr.
    if cfg.mode == "transfer":
        supports, why["supports"] = hr.schedule(dataset_size)
        lr, why["lr"] = hr.BASE_LR, "BiT-HyperRule base lr 0.003 (SGD momentum 0.9)"
        wd, why["weight_decay"] = 0.0, "BiT-HyperRule: no weight decay"
        mix, why["mixup"] = hr.mixup_alpha(dataset_size)
    else:
        spe = max(1, dataset_size // cfg.batch)
        supports = hr.upstream_supports(spe, cfg.epochs, cfg.warmup, cfg.schedule, cap=cfg.warmup_cap)
        ref, decays = hr.UPSTREAM_SCHEDULES[cfg.schedule]
        epochs = ref if cfg.epochs is None else cfg.epochs
        why["supports"] = (f"upstream {cfg.schedule}: {epochs:g} epochs x {spe} steps, /10 at epochs "
                           f"{'/'.join(map(str, decays))} of {ref}" + (" (scaled)" if epochs != ref else "")
                           + f"; warmup {cfg.warmup}"
                           + (f" capped at {supports[0]}" if supports[0] < cfg.warmup else "")
                           + (" (--warmup-cap tenth: at most a tenth of the run)" if cfg.warmup_cap == "tenth"
                              else " (capped only at the first decay)"))
        lr, why["lr"] = hr.upstream_lr(cfg.batch), f"upstream: 0.03 x batch/256 = {hr.upstream_lr(cfg.batch):g}"
        wd, why["weight_decay"] = 1e-4, "upstream recipe: weight decay 1e-4"
        mix, why["mixup"] = 0.0, "upstream recipe: no MixUp"
    if cfg.steps is not None:
        supports = hr.scale_supports(supports, cfg.steps)
        why["supports"] += f"; --steps {cfg.steps} stretches it to {supports}"
    if cfg.lr is not None:
        lr, why["lr"] = cfg.lr, f"--lr {cfg.lr:g}"
    if cfg.mixup is not None:
        mix, why["mixup"] = cfg.mixup, f"--mixup {cfg.mixup:g}"
    if cfg.weight_decay is not None:
        wd, why["weight_decay"] = cfg.weight_decay, f"--weight-decay {cfg.weight_decay:g}"
    rank_batch, split = _split_for_rank(cfg.batch, cfg.batch_split, world_size)
    why["batch"] = (f"global batch {cfg.batch} = {world_size} rank(s) x {rank_batch}"
                    f" = {split} micro-batch(es) of {rank_batch // split} per rank"
                    + (" (the rule's 512)" if cfg.batch == hr.BATCH else " (--batch)"))
    why["flip"] = "--no-flip" if cfg.no_flip else "random horizontal flip"
    why["random_crop"] = "--no-crop (resize straight to the crop size)" if cfg.no_crop else "random crop"
    up = cfg.mode == "upstream"
    extra = dict(loss=cfg.loss, decode=cfg.decode)
    extra["head_bias"] = cfg.head_bias if cfg.head_bias is not None else (-10.0 if cfg.loss == "sigmoid" else 0.0)
    why["loss"] = f"--loss {cfg.loss}" + (": multi-hot targets, per-class binary cross-entropy"
                                          if cfg.loss == "sigmoid" else "")
    why["head_bias"] = (f"--head-bias {cfg.head_bias:g}" if cfg.head_bias is not None else
                        "sigmoid: -10 (big_vision bit_i21k init_head_bias)" if cfg.loss == "sigmoid" else "softmax: 0")
    if up:
        extra.update(wd_on=cfg.wd_on, eval_crop=cfg.eval_crop, crop_area=cfg.crop_area)
        why["wd_on"] = (f"--wd-on {cfg.wd_on}: " + ("conv kernels only, not GroupNorm scales/biases or the head bias "
                                                   "(big_vision)" if cfg.wd_on == "kernels" else "every parameter"))
        why["eval_crop"] = (f"--eval-crop {cfg.eval_crop}: " + ("short side to the resize, central crop (big_vision)"
                                                               if cfg.eval_crop == "center" else "squash to the crop"))
        why["crop_area"] = f"--crop-area {cfg.crop_area:g}: " + ("big_vision" if cfg.crop_area == 0.05 else
                                                               "torchvision" if cfg.crop_area == 0.08 else "custom")
    return Recipe(cfg.mode, dataset_size, num_classes, resize, crop, not cfg.no_flip, not cfg.no_crop,
                  supports, lr, wd, mix, cfg.batch, world_size, rank_batch, split, why, **extra)


def describe(recipe):
    """Multi-line text for --dry-run and the start of a run."""
    r = recipe
    up = r.mode == "upstream"
    rows = [
        ("dataset", f"{r.dataset_size:,} training examples, {r.num_classes} classes", None),
        ("resolution", f"Inception crop ({r.crop_area:g}-1 of the area) -> {r.crop}" if up and r.random_crop
         else f"resize {r.resize} -> crop {r.crop}", "resolution"),
        ("supports", f"warmup {r.supports[0]}, /10 after {r.supports[1:-1]}, end {r.steps} steps", "supports"),
        ("lr", f"{r.lr:g}", "lr"),
        ("weight decay", f"{r.weight_decay:g}" + (f" on {r.wd_on}" if r.weight_decay else ""), "weight_decay"),
        ("mixup alpha", f"{r.mixup:g}", "mixup"),
        ("batch", f"{r.batch}", "batch"),
        ("flip", str(r.flip), "flip"),
        ("random crop", str(r.random_crop), "random_crop"),
        ("loss", r.loss, "loss"),
        ("head bias", f"{r.head_bias:g}", "head_bias"),
    ]
    if up:
        rows += [("wd on", r.wd_on, "wd_on"), ("crop area", f"{r.crop_area:g}-1", "crop_area"),
                 ("eval", f"resize short side {r.resize}, central crop {r.crop}" if r.eval_crop == "center"
                  else f"resize to {r.crop}x{r.crop}", "eval_crop")]
    lines = [f"{r.mode} recipe:"]
    lines += [f"  {k:<13}{v}" + (f"   [{r.why[w]}]" if w in r.why else "") for k, v, w in rows]
    return "\n".join(lines)
