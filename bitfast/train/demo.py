"""`bitfast-train demo`: the whole BiT story on a 2-core CPU in a few minutes, on real data shipped in the package.

1. upstream: pre-train bit_tiny on Fashion-MNIST classes 0-4 (t-shirt, trouser, pullover, dress, coat);
2. transfer: BiT-HyperRule to classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), 10 images per class;
3. scratch: the same model and recipe from random init;
then print transfer vs scratch accuracy on the 5-9 test images. Each stage is a normal run directory, so
re-running resumes (or just re-reports) what is already done.
The recipe is BiT-HyperRule scaled to the CPU: crops of 28 (resize 32) instead of 128 (160), batch 64
instead of 512, 100 steps instead of 500 (same warmup and /10 points, relatively).
"""
import json
import os
import time

import torch

from bitfast.train.config import make_config
from bitfast.train.loop import train

QUICK = dict(upstream=dict(epochs=1, resolution="20,16", warmup=5, batch=64),
             transfer=dict(steps=12, resolution="20,16", batch=32))


def run_demo(out="runs/demo", data="small", quick=False, progress=True, threads=1, workers=1):
    """threads: torch CPU threads. One is the default: bit_tiny at 28px makes tiny ops, where OpenMP threads
    cost more than they give, and several threads stall badly on a machine shared with other jobs (on a
    busy 2-core box, 2 threads ran the demo ~6x slower than 1). workers: DataLoader processes (the second core
    decodes and augments while the first trains)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _demo(out, data, quick, progress, workers)
    finally:
        torch.set_num_threads(previous)


def _demo(out, data, quick, progress, workers):
    t0 = time.time()
    up_kw = QUICK["upstream"] if quick else {}
    tr_kw = QUICK["transfer"] if quick else {}
    common = dict(progress=progress, workers=workers)
    print(f"== 1/3 upstream: bit_tiny on Fashion-MNIST classes 0-4 ({data} set)")
    up = train(make_config("demo-upstream", out=os.path.join(out, "upstream"), data=f"fashion-mnist-{data}:0-4",
                           **common, **up_kw))
    weights = os.path.join(out, "upstream", "model.pt")
    print("\n== 2/3 transfer: BiT-HyperRule to classes 5-9, 10 images per class")
    tr = train(make_config("demo-transfer", out=os.path.join(out, "transfer"), weights=weights,
                           data=f"fashion-mnist-{data}:5-9", **common, **tr_kw))
    print("\n== 3/3 the same model and recipe from scratch")
    sc = train(make_config("demo-transfer", out=os.path.join(out, "scratch"), data=f"fashion-mnist-{data}:5-9",
                           **common, **tr_kw))
    wall = time.time() - t0
    result = dict(upstream_top1=up["top1"], transfer_top1=tr["top1"], transfer_top5=tr["top5"],
                  scratch_top1=sc["top1"], scratch_top5=sc["top5"], eval_images=tr["eval_images"], wall_s=wall)
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nbitfast demo ({wall:.0f} s): Fashion-MNIST classes 5-9, 10 training images per class, "
          f"{tr['eval_images']:,} test images")
    print(f"  upstream (classes 0-4) top-1       {100 * up['top1']:6.2f}%")
    print(f"  transfer from upstream  top-1      {100 * tr['top1']:6.2f}%")
    print(f"  same model from scratch top-1      {100 * sc['top1']:6.2f}%")
    print(f"  (plots: {out}/*/plot.png; summaries: {out}/demo.json)")
    return result
