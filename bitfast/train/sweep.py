"""`bitfast-train sweep`: the random hyperparameter search of the paper's appendix A (Section 4.4, Fig. 3 "100
HPs", Fig. 6).

    lr                 log-uniform in [1e-4, 1e-1]
    steps              one of 500, 1000, 2000, 4000, 8000, 16000
    dropout            uniform in [0, 0.7], on the pre-logits
    weight_decay_init  log-uniform in [1e-6, 1e-1], towards the initial (pre-trained) weights
    mixup              one of none, 0.05, 0.1, 0.2, 0.4
    resolution         crop one of 64, 128, 192, 256, 320, 384 (resize in the HyperRule's ratio)

Trial i draws from a generator seeded by (sweep_seed, i), so the trials do not depend on how often the sweep was
restarted. Each trial trains on 80% of train/ (800 of VTAB-1k's 1000) and is scored on the other 20% (200);
the best (ties: the earlier trial) is trained again on all of train/ and scored on test/. A key=value override
fixes that knob for every trial instead of sampling it. Trials are run directories (OUT/trials/NNN): finished
ones are read back, an interrupted one resumes, and a diverging one (NaN loss) is recorded as failed. Under
torchrun every rank runs the same trial, one at a time, over all ranks.
"""
import json
import math
import os

import numpy as np

from bitfast.train import protocol as P

STEPS = (500, 1000, 2000, 4000, 8000, 16000)
MIXUP = (0.0, 0.05, 0.1, 0.2, 0.4)
CROPS = (64, 128, 192, 256, 320, 384)
OWNED = {"data", "out", "eval_split", "examples_per_class"}


def sample(sweep_seed, trial):
    rng = np.random.default_rng([sweep_seed, trial])
    return dict(lr=float(10 ** rng.uniform(-4, -1)), steps=int(rng.choice(STEPS)),
                dropout=float(rng.uniform(0.0, 0.7)), weight_decay_init=float(10 ** rng.uniform(-6, -1)),
                mixup=float(rng.choice(MIXUP)), resolution=str(int(rng.choice(CROPS))))


def add_parser(sub):
    p = sub.add_parser("sweep", help="random hyperparameter search (paper appendix A): select on the 200-example "
                                     "validation split, report the chosen config's test top-1")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ (VTAB-1k: 1000 images) and test/")
    p.add_argument("--trials", type=int, required=True, help="number of random trials (the paper: 50 or 100)")
    p.add_argument("--sweep-seed", type=int, default=0, help="seed of the sampled hyperparameters (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 80/20 selection split (default 0)")
    P.add_common(p)
    p.set_defaults(protocol=P.grouped(main))


def main(args):
    from bitfast.train.loop import NonFiniteLoss
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    if not os.path.isdir(os.path.join(args.data, "test")):
        raise FileNotFoundError(f"--data: {args.data} has no test/ folder (the final score is on test/)")
    P.base_config(args, OWNED, data=args.data)
    fixed = sorted(P.overridden(args) & set(sample(0, 0)))
    split = P.selection_split(args.data, os.path.join(args.out, "split"), args.split_seed)
    trials = []
    for i in range(args.trials):
        out = os.path.join(args.out, "trials", f"{i:03d}")
        cfg = P.base_config(args, OWNED, data=split, eval_split="val", out=out, **sample(args.sweep_seed, i))
        params = {k: getattr(cfg, k) for k in sample(0, 0)}
        failed = os.path.join(out, "failed.json")
        if os.path.exists(failed):
            with open(failed) as f:
                trials.append(dict(json.load(f), trial=i))
            continue
        P.log(f"== sweep trial {i + 1}/{args.trials}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else
                                                                   f"{k} {v}" for k, v in params.items()))
        try:
            s = P.run(cfg)
            trials.append(dict(trial=i, params=params, val_top1=s["top1"]))
        except NonFiniteLoss as e:
            P.log(f"trial {i} diverged: {e}")
            trials.append(dict(trial=i, params=params, val_top1=None, error=str(e)[:300]))
            if P.is_main():
                os.makedirs(out, exist_ok=True)
                with open(failed, "w") as f:
                    json.dump(trials[-1], f, indent=1)
        report(args, trials, fixed, None)
    scored = [t for t in trials if t["val_top1"] is not None]
    if not scored:
        raise ValueError(f"sweep: all {len(trials)} trial(s) diverged; nothing to select")
    best = max(scored, key=lambda t: (t["val_top1"], -t["trial"]))
    P.log(f"== sweep: trial {best['trial']} is best on val ({P.pct(best['val_top1'])}%); final run on all of "
          "train/ -> test/")
    cfg = P.base_config(args, OWNED, data=args.data, eval_split="test", out=os.path.join(args.out, "final"),
                        **best["params"])
    final = P.run(cfg)
    P.log("\n" + report(args, trials, fixed, dict(best, test_top1=final["top1"], test_images=final["eval_images"])))
    return 0


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) and not math.isnan(v) else str(v)


def report(args, trials, fixed, chosen):
    keys = list(sample(0, 0))
    rows = [(t["trial"], *(_fmt(t["params"][k]) for k in keys), P.pct(t["val_top1"]) if t["val_top1"] is not None
             else "diverged") for t in trials]
    md = [f"# Random hyperparameter search on {args.data}: {len(trials)} of {args.trials} trials", "",
          P.md_table(("trial", *keys, "val top-1"), rows)]
    if fixed:
        md += ["", f"Fixed by key=value (not sampled): {', '.join(fixed)}"]
    if chosen:
        md += ["", f"**chosen: trial {chosen['trial']}** ("
               + ", ".join(f"{k} {_fmt(v)}" for k, v in chosen["params"].items())
               + f"): val top-1 {P.pct(chosen['val_top1'])}, **test top-1 {P.pct(chosen['test_top1'])}** "
               f"on {chosen['test_images']} test images"]
    P.write_tables(args.out, "sweep", dict(data=args.data, sweep_seed=args.sweep_seed, split_seed=args.split_seed,
                                           fixed=fixed, trials=trials, chosen=chosen), "\n".join(md))
    return "\n".join(md)
