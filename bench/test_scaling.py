"""Scaling benchmarks: R50x1 train-step time against batch size and resolution (128, 224, 384, 480), and DDP
scaling efficiency against world size where more than one GPU exists.

Candidates: GN+WS with bitfast, the timm-style composite GN+WS and BN+plain (see test_models), timed
alternately at every size. GPU: bf16 autocast, channels_last, eager. CPU (quick mode): bit_tiny at 32-64 px,
fp32 NCHW. DDP (NCCL, one process per GPU) runs a fixed batch per GPU and reports
efficiency = img/s(world) / (world * img/s(1)). With one GPU it records the single-GPU figure and says so.
BITFAST_BENCH_DDP_CPU=N runs the DDP path on the CPU with gloo and N processes, to exercise it without GPUs.
"""
import gc
import os
import socket

import pytest
import torch

from bench import _timing as T
from bench.test_models import HEADLINE, R50, Setting, check_measured, free_memory, label, make_data, make_step, \
    print_table, run_setting

pytestmark = pytest.mark.usefixtures("cpu_threads")
DDP_CPU = int(os.environ.get("BITFAST_BENCH_DDP_CPU", "0"))


def base_setting(batch, res):
    if T.ON_GPU:
        return Setting(R50, "train", "eager", "bf16", "channels_last", res, batch, True, True)
    return Setting("bit_tiny", "train", "eager", "fp32", "nchw", res, batch, False, True)


def sweep(kind, sizes, s):
    """Time the headline candidates at every size of `kind` ("batch" or "res"), reusing the built models."""
    built, records = {}, []
    for size in sizes:
        batch, res = (size, s.res) if kind == "batch" else (s.batch, size)
        recs, outs, built = run_setting(s, HEADLINE, batch=batch, res=res, built=built)
        check_measured(recs, outs)
        for r in recs:
            r["suite"], r["name"] = "scaling", f"{kind}/{size}/{r['name'].rsplit('/', 1)[1]}"
        records += recs
    del built
    free_memory()
    T.write_records(records)
    print_table(records)
    return records


def test_batch_scaling():
    torch.backends.cudnn.benchmark = True
    sizes = ((16, 32, 64) if T.QUICK else (32, 64, 128, 256)) if T.ON_GPU else (2, 4, 8)
    records = sweep("batch", sizes, base_setting(0, 224 if T.ON_GPU else 32))
    assert {r["params"]["batch"] for r in records if "img_per_s" in r} == set(sizes)


def test_resolution_scaling():
    torch.backends.cudnn.benchmark = True
    sizes = (128, 224, 384, 480) if T.ON_GPU else (32, 48, 64)
    records = sweep("res", sizes, base_setting(32 if T.QUICK else 64, 0) if T.ON_GPU else base_setting(4, 0))
    assert {r["params"]["res"] for r in records if "img_per_s" in r} == set(sizes)


# ------------------------------------------------------------------------------------------------ DDP
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, s, on_cpu, queue):
    """One rank: GN+WS bitfast model under DDP, a fixed per-rank batch; rank 0 reports the median step ms."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bench.test_models import build

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu") if on_cpu else torch.device("cuda", rank)
    if on_cpu:
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    dist.init_process_group("gloo" if on_cpu else "nccl", rank=rank, world_size=world)
    try:
        model, _, _ = build(HEADLINE[0], s, device)
        ddp = DDP(model, device_ids=None if on_cpu else [rank])
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-4, momentum=0.9)
        x, y = make_data(s, device=device)
        st = T.measure(make_step(ddp, opt, x, y, s), device, warmup=2 if on_cpu else 5, repeats=5, inner=1 if on_cpu else 3)
        if rank == 0:
            queue.put(st.as_dict())
        del ddp, opt, model
        gc.collect()
    finally:
        dist.destroy_process_group()


def run_ddp(world, s, on_cpu):
    ctx = torch.multiprocessing.get_context("spawn")
    queue, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, s, on_cpu, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad or queue.empty():
        raise RuntimeError(f"DDP run with world size {world} failed: exit codes {[p.exitcode for p in procs]}")
    return T.Stats(**queue.get())


def test_ddp_scaling():
    n = DDP_CPU or (torch.cuda.device_count() if T.ON_GPU else 0)
    on_cpu = bool(DDP_CPU)
    s = base_setting(4, 32) if on_cpu else base_setting(32 if T.QUICK else 128, 224)
    if n < 2:
        if not T.ON_GPU:
            pytest.skip("DDP scaling needs at least 2 GPUs (set BITFAST_BENCH_DDP_CPU=2 to exercise it on the CPU)")
        recs, outs, _ = run_setting(s, HEADLINE[:1])
        check_measured(recs, outs)
        note = "one GPU visible: DDP scaling not measured; single-GPU figure, no DDP wrapper"
        T.write_records([T.record("ddp", "world1", T.Stats(**{k: recs[0][k] for k in T.Stats.__dataclass_fields__}),
                                  params=recs[0]["params"], world_size=1, img_per_s=recs[0]["img_per_s"],
                                  efficiency=None, note=note)])
        pytest.skip(f"{note}: {recs[0]['img_per_s']:.1f} img/s (GN+WS bitfast, batch {s.batch})")
    worlds = sorted({w for w in (1, 2, 4, 8, 16) if w <= n} | {n})
    records, base = [], None
    for w in worlds:
        st = run_ddp(w, s, on_cpu)
        ips = w * s.batch / (st.median_ms * 1e-3)
        base = base or ips
        records.append(T.record("ddp", f"world{w}", st, world_size=w, per_rank_batch=s.batch, img_per_s=ips,
                                efficiency=ips / (w * base), params=dict(model=s.model, res=s.res,
                                candidate=label(HEADLINE[0]), backend="gloo-cpu" if on_cpu else "nccl")))
        print(f"DDP world {w}: {ips:.1f} img/s, efficiency {ips / (w * base):.2f}")
    T.write_records(records)
    assert all(r["img_per_s"] > 0 and r["efficiency"] > 0 for r in records)
