"""torchrun helpers: rank and world size, metric all-reduce, rank-0-only I/O.

Under `torchrun --nproc_per_node N` the environment holds RANK, WORLD_SIZE and LOCAL_RANK; the
process group uses NCCL on GPUs and gloo on the CPU. Without torchrun everything here is a no-op
for a single process, so scripts need no special case.
"""
import json
import os

import torch
import torch.distributed as tdist


def init(device: str = "auto") -> tuple[int, int, int]:
    """Join the process group if launched by torchrun. Returns (rank, world_size, local_rank)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not tdist.is_initialized():
        use_nccl = device != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local)
        tdist.init_process_group("nccl" if use_nccl else "gloo")
    return rank, world, local


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place), returned for chaining."""
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_mean(metrics: dict) -> dict:
    """Average a dict of scalar metrics over ranks, in one collective call."""
    if not is_initialized() or not metrics:
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def broadcast_json(obj):
    """Rank 0's JSON-able object on every rank (sent as UTF-8 bytes, not pickled)."""
    if not is_initialized():
        return obj
    data = torch.tensor(list(json.dumps(obj).encode()) if rank() == 0 else [], dtype=torch.uint8)
    size = torch.tensor([data.numel()])
    tdist.broadcast(size, src=0)
    if rank() != 0:
        data = torch.empty(int(size), dtype=torch.uint8)
    tdist.broadcast(data, src=0)
    return json.loads(bytes(data.tolist()).decode())


def barrier():
    if is_initialized():
        tdist.barrier()


def shard(items: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's share of a list: items rank, rank + world, ... (every rank gets the same count
    when len(items) is a multiple of world)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return items[r::w]


def cleanup():
    if is_initialized():
        tdist.destroy_process_group()
