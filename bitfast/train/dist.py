"""torch.distributed glue for torchrun: NCCL on GPUs, gloo on CPU; a no-op for a single process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT from its rendezvous flags);
this module only reads them.
"""
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = True  # False when a caller (a protocol running many trainings) created the group

    @property
    def main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1


def pick_device(name, local_rank=0):
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
    return dev


def init(device="auto"):
    """Join the torchrun process group if there is one; returns this process's World."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    owns = not dist.is_initialized()
    if size > 1 and owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None,
                                **_elastic_store(rank, size))
    return World(rank, size, local, dev, owns)


def _elastic_store(rank, size):
    """The store for this attempt's process group under a torchrun that shares its own TCPStore with the workers
    (TORCHELASTIC_USE_AGENT_STORE=True, its default): that store outlives the workers, and torch (2.14) puts no
    attempt in the group's keys, so after a restart (--max-restarts) the new ranks read the dead
    ranks' gloo/NCCL addresses and fail to connect. TORCHELASTIC_RESTART_COUNT cannot tell the attempts apart: an
    agent whose own workers did not fail restarts them without counting. So each rank counts its own starts in
    the store, key (world size, rank): torchelastic starts every rank of the world once per attempt, so the
    counts agree and name the attempt. (A worker that dies before it gets here while the others get through
    would put its count behind for good; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on the agents avoids the shared
    store altogether.)"""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from torch.distributed.constants import default_pg_timeout
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                          timeout=default_pg_timeout)
    start = store.add(f"bitfast/starts/{size}/{rank}", 1)
    return dict(store=dist.PrefixStore(f"bitfast/{size}/{start}/", store), rank=rank, world_size=size)


def all_sum(world, values):
    """Sum a list of floats over ranks (fp64 on the rank's device; one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(world, obj):
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world):
    if world.distributed:
        dist.barrier()


def shutdown(world):
    """Leave the process group. The caller drops its DDP model and optimizer first; gc.collect() then frees
    them before the group goes, else gloo can abort at exit (GUIDE §7). A group this World did not create is
    kept for its owner: re-creating the default group in one process can hang on the store's stale keys."""
    gc.collect()
    if world.distributed and dist.is_initialized():
        dist.barrier()
        if world.owns_group:
            dist.destroy_process_group()
