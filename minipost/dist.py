"""torchrun helpers: rank and world size, metric all-reduce, rank-0-only I/O, DDP or FSDP.

Under `torchrun --nproc_per_node N` the environment holds RANK, WORLD_SIZE and LOCAL_RANK; the
process group uses NCCL on GPUs and gloo on the CPU. Without torchrun everything here is a no-op
for a single process, so scripts need no special case.

Two ways to train on N processes (`wrap`):
- DDP (the default): every rank holds the whole model and optimizer; gradients are averaged.
- FSDP (`--fsdp`, PyTorch's FSDP2 `fully_shard`): each decoder layer's parameters, gradients and
  optimizer state are split over the ranks; a layer's full weights exist only while its forward
  or backward runs (all-gather before, reduce-scatter of the gradients after). For models that do
  not fit one device. Three places then need the whole weights, and get them from here:
  generation (`gathered`: all-gather once, decode any number of steps, shard again), saving
  (`full_model`, `full_state_dict`) and resume checkpoints (`full_optimizer_state`,
  `load_sharded`). FSDP runs on the CPU with gloo too, which is how the tests check it.
"""
import copy
import json
import os
import sys
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as tdist


def _is_dtensor(t) -> bool:
    """True for a sharded (FSDP2) tensor. `torch.distributed.tensor` is imported only by `wrap`
    with fsdp (importing it costs ~40 MB and 0.7 s in every process), so until then none exists."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


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


def all_reduce_max(x: float) -> float:
    """The largest of a float over ranks (x itself without torchrun)."""
    if not is_initialized():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t)


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
    """Leave the process group, after every rank has finished its last collective."""
    if is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


# ---------------------------------------------------------------- DDP or FSDP

_SKELETONS = weakref.WeakKeyDictionary()   # sharded model -> its unsharded twin on the meta device
_GATHERED = weakref.WeakSet()              # sharded models inside `gathered` now


def wrap(model: torch.nn.Module, fsdp: bool = False) -> torch.nn.Module:
    """The module the training step calls. One process: `model`. Under torchrun: DDP(model), or
    with `fsdp` the model itself, sharded in place by FSDP2: each decoder layer is its own unit
    (all-gathered for its forward and backward, then freed), the rest (embeddings, final norm,
    heads) one more. Build the optimizer AFTER this call: sharding replaces the parameters."""
    if world_size() == 1:
        if fsdp:
            print("--fsdp: one process has nothing to shard over; training unsharded "
                  "(launch with torchrun --nproc_per_node N)")
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from .model import Block
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    # the twin costs no memory (parameters on the meta device); buffers (RoPE tables) are real
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()}
    _SKELETONS[model] = copy.deepcopy(model, memo)
    name, blocks = type(model).__name__, [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if rank() == 0:
        print(f"fsdp: {name} sharded over {world_size()} processes "
              f"({len(blocks)} layers + 1 root unit)")
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `model` (or a module inside it) was sharded by `wrap(..., fsdp=True)`."""
    return any(_is_dtensor(p) for p in model.parameters())


@contextmanager
def gathered(model: torch.nn.Module):
    """Inside the block a sharded model holds its full weights, so ranks may run different
    numbers of forward passes (generation stops when its sequences end, evaluation shards may be
    uneven) without waiting on each other's all-gathers. Every rank must enter it. A no-op for
    an unsharded model, and inside another `gathered` of the same model."""
    fsdp = sys.modules.get("torch.distributed.fsdp")   # not imported: nothing is sharded (and
    units = [m for m in model.modules()                # importing it costs ~45 MB, as `_is_dtensor`)
             if fsdp is not None and isinstance(m, fsdp.FSDPModule)]
    if not units or model in _GATHERED:          # unsharded, or inside an outer `gathered`
        yield model
        return
    _GATHERED.add(model)
    for unit in units:
        unit.unshard()                                   # one all-gather per unit
        if unit is not model:
            unit.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        _GATHERED.discard(model)
        for unit in units:
            unit.reshard()
            if unit is not model:
                unit.set_reshard_after_forward(True)


def _full(t):
    return t.full_tensor() if _is_dtensor(t) else t


def full_state_dict(model: torch.nn.Module) -> dict:
    """`model.state_dict()` with every shard gathered into the whole tensor. Every rank must call
    it (the gathers are collective); for an unsharded model it is the state dict itself."""
    return {k: _full(v) for k, v in model.state_dict().items()}


def full_model(model: torch.nn.Module):
    """The model to save: `model` itself when unsharded; for a sharded one, an unsharded copy on
    the CPU on rank 0 (None on the other ranks). Every rank must call it."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    if rank() != 0:
        return None
    skeleton = _SKELETONS[model]
    plain = copy.deepcopy(skeleton).to_empty(device="cpu")
    plain.load_state_dict({k: v.cpu() for k, v in state.items()})
    for name, buf in skeleton.named_buffers():      # non-persistent ones are not in `state`
        plain.get_buffer(name).copy_(buf)
    return plain


def full_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with sharded moments gathered whole (collective, every rank)."""
    sd = optimizer.state_dict()
    return {**sd, "state": {i: {k: _full(v) for k, v in s.items()}
                            for i, s in sd["state"].items()}}


def load_sharded(model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict):
    """Load whole tensors (from `full_state_dict` / `full_optimizer_state`) into a sharded model
    and its optimizer: each rank keeps its own shard. Every rank must call it."""
    from torch.distributed.tensor import distribute_tensor
    params = dict(model.named_parameters())
    for name, t in model_state.items():
        target = params.get(name)
        if target is None:                       # a buffer: not sharded
            continue
        with torch.no_grad():
            t = t.to(device=target.device, dtype=target.dtype)
            target.copy_(distribute_tensor(t, target.device_mesh, target.placements)
                         if _is_dtensor(target) else t)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for i, state in optimizer_state["state"].items():
        p = ordered[int(i)]
        if _is_dtensor(p):
            optimizer_state["state"][i] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                for k, v in state.items()}
    optimizer.load_state_dict(optimizer_state)
