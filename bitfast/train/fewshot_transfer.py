"""`bitfast-train fewshot-transfer`: the paper's low-data protocol (Section 3.5, Fig. 2).

For each K in --shots and each of --draws draws: fine-tune with BiT-HyperRule on K training images per class and
take top-1 on the evaluation split (test/ when there is one). The draw d uses fewshot_seed = draw_seed + d, apart
from the training seed, so only the subset changes between draws. With one seed the K-shot subsets are nested
(the first K of each class in one seeded order), as for a learning curve. Reports the median and the range
(min, max) of top-1 per K, as Fig. 2 does (5 draws per K in the paper).
"""
import os

import numpy as np

from bitfast.train import config as C
from bitfast.train import protocol as P

OWNED = {"data", "out", "examples_per_class", "fewshot_seed"}


def add_parser(sub):
    p = sub.add_parser("fewshot-transfer", help="K-shot transfer for several K and draws; median and range per K")
    p.add_argument("--data", required=True, help="ImageFolder root (train/ + test/ or val/) or a built-in dataset")
    p.add_argument("--shots", default="1,5,10,25", help="examples per class, comma-separated (default 1,5,10,25)")
    p.add_argument("--draws", type=int, default=5, help="random subsets per K (default 5, as the paper)")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of draw 0; draw d uses draw-seed + d (default 0)")
    p.add_argument("--eval-split", choices=("auto", "test", "val"), help="default auto: test/ when there is one")
    P.add_common(p)
    p.set_defaults(protocol=P.grouped(main))


def main(args):
    shots = C.parse_shots(args.shots, "--shots")
    if args.draws < 1:
        raise ValueError(f"--draws must be >= 1, got {args.draws}")
    extra = dict(eval_split=args.eval_split) if args.eval_split else {}
    P.base_config(args, OWNED, data=args.data, **extra)
    runs = {}
    for k in shots:
        runs[k] = []
        for d in range(args.draws):
            P.log(f"== fewshot-transfer: {k} per class, draw {d + 1}/{args.draws} (fewshot_seed {args.draw_seed + d})")
            cfg = P.base_config(args, OWNED, data=args.data, examples_per_class=k, fewshot_seed=args.draw_seed + d,
                                out=os.path.join(args.out, f"{k}shot", f"draw{d}"), **extra)
            runs[k].append(P.run(cfg)["top1"])
        report(args, runs)
    P.log("\n" + report(args, runs))
    return 0


def report(args, runs):
    rows, data = [], {}
    for k, v in runs.items():
        data[k] = dict(top1=v, median=float(np.median(v)), min=min(v), max=max(v), draws=len(v))
        rows.append((k, len(v), P.pct(data[k]["median"]), f"{P.pct(min(v))} – {P.pct(max(v))}",
                     ", ".join(P.pct(x) for x in v)))
    md = (f"# Few-shot transfer on {args.data}\n\n"
          + P.md_table(("examples/class", "draws", "median top-1", "range", "per draw"), rows)
          + f"\n\ndraw d: fewshot_seed {args.draw_seed} + d; training seed {args.seed or 0}")
    P.write_tables(args.out, "fewshot", dict(data=args.data, draw_seed=args.draw_seed, shots=data), md)
    return md
