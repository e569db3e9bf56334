"""bitfast-train: BiT transfer (BiT-HyperRule), upstream pre-training, and a built-in CPU demo.

    bitfast-train demo
    bitfast-train transfer --model BiT-M-R50x1 --weights BiT-M-R50x1.npz --data ~/flowers --out runs/flowers
    torchrun --nproc_per_node=8 -m bitfast.train.cli transfer ...      (same flags; global batch stays 512)
Any config field can also be given as key=value after the flags (e.g. ckpt_every=50).
"""
import argparse
import os
import sys

from bitfast.train import config as C

EPILOG = """Values left out are chosen by BiT-HyperRule from the data (see --dry-run). Re-running with the same
--out continues from <out>/last.pt. Extra key=value pairs set any TrainConfig field (e.g. ckpt_every=50)."""


def _add_run_flags(p, upstream=False):
    a = p.add_argument
    a("--model", help="zoo name (bitfast.models.list_models()), e.g. BiT-M-R50x1, bit_tiny")
    a("--weights", help="pre-trained weights: official BiT .npz, timm state_dict, or a bitfast model.pt")
    a("--data", help="ImageFolder root with train/ and val/ (or test/), a built-in dataset: fashion-mnist, "
                     "fashion-mnist-small, fashion-mnist-full, with optional classes, e.g. fashion-mnist:5-9, or a "
                     "webdataset shard pattern, e.g. '/data/i21k/train-{0000..2047}.tar' (bitfast-train pack)")
    a("--out", help="run directory (checkpoints, metrics.jsonl, plot.png, summary.json); default runs/bitfast")
    a("--examples-per-class", type=int, help="few-shot: keep K training examples per class (seeded; 0 = all)")
    a("--seed", type=int, help="seed for the few-shot choice, data order, augmentation and MixUp (default 0)")
    a("--batch", type=int, help="GLOBAL batch over all ranks (default 512 transfer, 4096 upstream)")
    a("--batch-split", type=int, help="split each step into this many micro-batches on one device to save memory; "
                                      "with several ranks the per-rank split is derived (same effective batch)")
    a("--lr", type=float, help="base learning rate (default: 0.003 transfer, 0.03*batch/256 upstream)")
    a("--steps", type=int, help="total steps; the rule's warmup/decay points are stretched to end here")
    a("--resolution", help="'RESIZE,CROP' (e.g. 160,128) or 'CROP'; default from the image size (HyperRule)")
    a("--paper-res", action="store_true", default=None, help="use the paper's (448, 384) instead of the code's "
                                                               "(512, 480) for images of 96x96 or more")
    a("--mixup", type=float, help="MixUp alpha (default: 0.1 for >= 20k examples, else 0)")
    a("--no-flip", action="store_true", default=None, help="no random horizontal flip (VTAB dSprites, SmallNORB)")
    a("--no-crop", action="store_true", default=None, help="no random crop: resize straight to the crop size "
                                                             "(VTAB Clevr, DMLab, KITTI, dSprites/location)")
    a("--eval-split", choices=C.CHOICES["eval_split"], help="auto (default): test/ when there is one (the official "
                                                            "split), else val/; or force test or val")
    a("--exclude", help="file of image paths (one per line, e.g. dedup's exclude.txt) to leave out of the data")
    a("--fewshot-seed", type=int, help="seed of the few-shot draw (default: --seed), to vary only the subset")
    a("--dropout", type=float, help="dropout rate on the pre-logits (random search; HyperRule: 0)")
    a("--weight-decay-init", type=float, help="L2 penalty towards the initial weights (random search; HyperRule: 0)")
    a("--precision", choices=C.CHOICES["precision"], help="fp32 (default), bf16 or fp16 autocast (fp16: CUDA)")
    a("--channels-last", action="store_true", default=None, help="NHWC memory format (faster on GPUs)")
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--backend", help="bitfast kernel backend: torch, cpu, cuda or triton (default: auto)")
    a("--device", help="auto (default), cpu, cuda")
    a("--eval-every", type=int, help="evaluate every N steps (default: 5 times per run; 0 = only at the end)")
    a("--ckpt-every", type=int, help="checkpoint every N steps (default: 10 times per run, and at the end)")
    a("--ckpt-minutes", type=float, help="also checkpoint when this many minutes passed since the last checkpoint")
    a("--keep-ckpts", type=int, help="also keep the last K checkpoints as <out>/ckpt-<step>.pt (default 0)")
    a("--workers", type=int, help="DataLoader workers per rank (default: 0 for built-in data, else up to 8)")
    a("--decode", choices=C.CHOICES["decode"], help="decode + resize: fast (default; torchvision's JPEG decode, uint8 "
                                                  "tensor resizes), pil (Pillow, as before), gpu (nvjpeg; needs CUDA)")
    a("--resume", help="checkpoint to resume from (default: <out>/last.pt when it exists); once the run started "
                       "from it has written <out>/last.pt, a restart or rerun goes on from that")
    a("--stop-after", type=int, help="checkpoint and exit after N steps of this invocation (time-sliced jobs)")
    a("--norm", choices=C.CHOICES["norm"], help="gn (default) or bn: ablation variants (from scratch)")
    a("--conv", choices=C.CHOICES["conv"], help="ws (default) or plain")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    if upstream:
        a("--schedule", choices=C.CHOICES["schedule"],
          help="bit-m (default: BiT-S/M, 90 epochs, /10 at 30/60/80) or bit-l (BiT-L: 40 epochs, /10 at 10/23/30/37)")
        a("--epochs", type=float, help="upstream epochs (default: the schedule's; decay epochs scale with it)")
        a("--warmup", type=int, help="upstream warmup steps (default 5000, the paper's)")
        a("--warmup-cap", choices=C.CHOICES["warmup_cap"], help="decay (default): cap the warmup only where it would "
                                                                "reach the first decay; tenth: at a tenth of the run")
        a("--weight-decay", type=float, help="default 1e-4 upstream")
        a("--wd-on", choices=C.CHOICES["wd_on"], help="kernels (default, big_vision): weight decay on conv kernels "
                                                      "only; all: on every parameter (GroupNorm and biases too)")
        a("--loss", choices=C.CHOICES["loss"], help="softmax (default) or sigmoid cross-entropy (multi-hot targets; "
                                                    "multi-label data such as ImageNet-21k)")
        a("--head-bias", type=float, help="initial head bias of a model trained from scratch (default: -10 for "
                                          "sigmoid, big_vision's init_head_bias; 0 for softmax)")
        a("--crop-area", type=float, help="Inception crop: smallest area fraction (default 0.05, big_vision; "
                                          "torchvision: 0.08)")
        a("--eval-crop", choices=C.CHOICES["eval_crop"], help="center (default, big_vision): resize the short side "
                                                              "to 256, central crop 224; squash: resize to 224x224")
        a("--minival", type=int, help="data with no val/ or test/: hold out this many training images as the "
                                      "eval set (fixed seed; default 10000)")
        a("--fewshot-data", help="few-shot linear eval (closed-form least squares on pre-logits) on this "
                                 "ImageFolder root or built-in name while training")
        a("--fewshot-every", type=int, help="run the few-shot eval every N steps (default 0: at the end only)")
        a("--fewshot-shots", help="images per class for the few-shot eval (default 1,5,10,25)")
    a("--dry-run", action="store_true", help="print the resolved recipe (and which rule chose each value) and exit")
    a("overrides", nargs="*", metavar="key=value", help="any TrainConfig field")


def parser():
    p = argparse.ArgumentParser(prog="bitfast-train", description=__doc__.split("\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    _add_run_flags(sub.add_parser("transfer", help="fine-tune with BiT-HyperRule", epilog=EPILOG), upstream=False)
    _add_run_flags(sub.add_parser("upstream", help="pre-train with the upstream recipe (GUIDE §4)"), upstream=True)
    d = sub.add_parser("demo", help="upstream on Fashion-MNIST 0-4, transfer to 5-9 at 10/class, vs from scratch "
                                    "(CPU, a few minutes)")
    d.add_argument("--out", default="runs/demo", help="demo run directory (default runs/demo)")
    d.add_argument("--data", choices=("small", "full", "auto"), default="small",
                   help="small: the subset shipped in the package (default); full: the Debian "
                        "dataset-fashion-mnist package; auto: full when installed")
    d.add_argument("--quick", action="store_true", help="a much smaller demo (tests, a smoke check)")
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the demo's ops are small, and more threads "
                        "stall badly when other jobs share the cores)")
    d.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (default 1)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    from bitfast.train import dedup, fewshot, fewshot_transfer, shards, sweep, vtab  # protocols and tools
    for m in (vtab, fewshot_transfer, sweep, dedup, fewshot, shards):
        m.add_parser(sub)
    return p


def config_from_args(args):
    skip = {"command", "overrides", "dry_run"}
    given = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    return C.make_config(args.command, overrides=args.overrides, **given)


def dry_run(cfg):
    from bitfast.train import data as D
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train_src, eval_src = D.open_data(cfg.data, cfg.eval_split, cfg.exclude,
                                      cfg.minival if cfg.mode == "upstream" else 0)
    idx = D.fewshot_indices(train_src.labels, cfg.examples_per_class,
                            cfg.seed if cfg.fewshot_seed is None else cfg.fewshot_seed)
    recipe = C.resolve(cfg, len(idx), train_src.image_hw(), len(train_src.classes), world)
    print(C.describe(recipe))
    print(f"  data         {train_src.name}: {len(train_src):,} images, {len(idx):,} used; "
          f"eval {eval_src.name}: {len(eval_src):,}")
    print(f"  eval split   {eval_src.name}   [--eval-split {cfg.eval_split}"
          + (": test/ when there is one, else val/]" if cfg.eval_split == "auto" else "]"))
    if cfg.dropout or cfg.weight_decay_init:
        print(f"  regularize   dropout {cfg.dropout:g} on the pre-logits, weight decay {cfg.weight_decay_init:g} "
              "towards the initial weights")
    if cfg.mode == "upstream" and cfg.fewshot_data:
        print(f"  fewshot      {cfg.fewshot_data}: {cfg.fewshot_shots}-shot linear eval on pre-logits at "
              f"{recipe.crop}px, "
              + (f"every {cfg.fewshot_every} steps and " if cfg.fewshot_every else "") + "at the end")
    print(f"  model        {cfg.model}" + (f" from {cfg.weights}" if cfg.weights else " (from scratch)"))
    print(f"  out          {cfg.out}")


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        print("\nNew here? Run `bitfast-train demo`: pre-train a small BiT on Fashion-MNIST classes 0-4, transfer it\n"
              "to classes 5-9 with 10 images per class, and compare with training from scratch (CPU, minutes).")
        return 0
    from bitfast.train.loop import NonFiniteLoss
    try:
        if args.command == "demo":
            from bitfast.train.demo import run_demo
            run_demo(args.out, args.data, quick=args.quick, progress=not args.no_progress, threads=args.threads,
                     workers=args.workers)
            return 0
        if getattr(args, "protocol", None):  # vtab, fewshot-transfer, sweep, dedup
            from bitfast.train.protocol import Stopped
            try:
                return args.protocol(args)
            except Stopped as e:
                return e.code
        cfg = config_from_args(args)
        if args.dry_run:
            dry_run(cfg)
            return 0
        from bitfast.train.loop import train
        return exit_code(train(cfg))
    except NonFiniteLoss as e:
        print(f"bitfast-train: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as e:  # bad input, a full disk, ...: one clear line (BITFAST_DEBUG=1: traceback)
        if os.environ.get("BITFAST_DEBUG"):
            raise
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        print(f"bitfast-train: error: {where}{e.strerror if where and e.strerror else e}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, FileNotFoundError)) else 1


def exit_code(result):
    """0 for a finished run or a planned stop_after; 128 + signal for a stop by a signal (on any rank)."""
    stopped = result.get("stopped")
    if stopped in (None, "stop_after"):
        return 0
    return 128 + {"SIGINT": 2}.get(stopped, 15)


if __name__ == "__main__":
    sys.exit(main())
