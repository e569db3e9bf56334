"""`bitfast-train demo`: the whole BiT story on a 2-core CPU in a few minutes, on real data shipped in the package.

1. upstream: pre-train bit_small on Fashion-MNIST classes 0-4 (t-shirt, trouser, pullover, dress, coat);
2. transfer: BiT-HyperRule to classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), 10 images per class;
3. scratch: the same model and recipe from random init;
steps 2-3 for 3 random draws of the 10 images per class (seeds 0-2): one draw is noisy at this size.
Each stage is a normal run directory, so re-running resumes (or just re-reports) what is already done.
The recipe is BiT-HyperRule scaled to the CPU: crops of 28 (resize 32) instead of 128 (160), batch 64
instead of 512, 100 steps instead of 500 (same warmup and /10 points, relatively).
"""
import json
import os
import time

import numpy as np
import torch

from bitfast.datasets import resolve_source
from bitfast.train.config import make_config
from bitfast.train.loop import train

SEEDS = (0, 1, 2)
QUICK = dict(upstream=dict(model="bit_tiny", epochs=1, resolution="20,16", warmup=5, batch=64),
             transfer=dict(model="bit_tiny", steps=12, resolution="20,16", batch=32))


def run_demo(out="runs/demo", data="small", quick=False, progress=True, threads=1, workers=1):
    """threads: torch CPU threads. One is the default: on a quiet 2-core box 2 threads trained 1.6x faster
    (618 vs 392 img/s), but as soon as another job used a core they fell to 62 img/s (OpenMP threads wait
    on each other in every one of the demo's small ops); 1 thread kept ~380 img/s. workers: DataLoader
    processes (the second core decodes and augments)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _demo(out, data, quick, progress, workers)
    finally:
        torch.set_num_threads(previous)


def _demo(out, data, quick, progress, workers):
    t0 = time.time()
    up_kw, tr_kw = (QUICK["upstream"], QUICK["transfer"]) if quick else ({}, {})
    if not quick and resolve_source(data) == "full":
        up_kw = dict(epochs=1)  # 30,000 images: 234 steps, against 138 for 6 epochs of the 3,000 shipped
    seeds = SEEDS[:1] if quick else SEEDS
    common = dict(progress=progress, workers=workers)
    up_cfg = make_config("demo-upstream", out=os.path.join(out, "upstream"), data=f"fashion-mnist-{data}:0-4",
                         **common, **up_kw)
    print(f"== upstream: {up_cfg.model} on Fashion-MNIST classes 0-4 ({data} set)")
    up = train(up_cfg)
    weights = os.path.join(out, "upstream", "model.pt")
    runs = {"transfer": [], "scratch": []}
    for seed in seeds:
        for kind in runs:
            what = "BiT-HyperRule transfer" if kind == "transfer" else "the same model and recipe from scratch"
            print(f"\n== draw {seed}: {what}, classes 5-9, 10 images per class")
            cfg = make_config("demo-transfer", out=os.path.join(out, kind, f"seed{seed}"), seed=seed,
                              data=f"fashion-mnist-{data}:5-9", weights=weights if kind == "transfer" else None,
                              **common, **tr_kw)
            runs[kind].append(train(cfg))
    wall = time.time() - t0
    top1 = {k: [s["top1"] for s in v] for k, v in runs.items()}
    result = dict(model=up_cfg.model, upstream_top1=up["top1"], seeds=list(seeds), transfer_top1=top1["transfer"],
                  scratch_top1=top1["scratch"], transfer_mean=float(np.mean(top1["transfer"])),
                  scratch_mean=float(np.mean(top1["scratch"])), eval_images=runs["transfer"][0]["eval_images"],
                  wall_s=wall)
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result, data, out))
    return result


def _pct(v):
    return f"{100 * v:6.1f}%"


def report(r, data, out):
    head = "".join(f"{'draw ' + str(s):>9}" for s in r["seeds"]) + f"{'mean':>9}"
    lines = [f"\nbitfast demo ({r['wall_s']:.0f} s, {data} data): {r['model']} pre-trained on Fashion-MNIST "
             f"classes 0-4 (top-1 {100 * r['upstream_top1']:.1f}% there),",
             f"then trained on classes 5-9 with 10 images per class; top-1 on {r['eval_images']:,} test images of 5-9:",
             f"  {'':<24}{head}",
             f"  {'transfer (HyperRule)':<24}" + "".join(f"{_pct(v):>9}" for v in r["transfer_top1"])
             + f"{_pct(r['transfer_mean']):>9}",
             f"  {'from scratch':<24}" + "".join(f"{_pct(v):>9}" for v in r["scratch_top1"])
             + f"{_pct(r['scratch_mean']):>9}",
             f"(plots: {out}/*/plot.png and {out}/*/seed*/plot.png; numbers: {out}/demo.json)"]
    return "\n".join(lines)
