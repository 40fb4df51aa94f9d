"""Data-parallel glue for torchrun: one process per device, the same global batches as a
single process.

Launch with ``torchrun --nproc_per_node=N -m conca.cli train ...``: every rank reads the same
shuffled stream, takes its contiguous share of each global batch, and the gradients are
averaged across ranks before each optimiser step, so the parameters stay identical everywhere
(and equal to single-process training up to float summation order). Batch statistics that a
loss or a dictionary's state depends on (dead-latent counters, the AuxK variance normaliser,
BatchTopK's threshold) are reduced across ranks where they are computed, through
`global_firing`, `global_centred_sum_sq` and `global_min`, which are identities outside
`data_parallel`. Only rank 0 writes checkpoints, saved dictionaries and progress bars.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from conca.errors import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (the batch size divides evenly)."""
        per_rank = len(batch) // self.world_size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]


_ACTIVE: DistributedContext | None = None


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: "torch.device | None" = None) -> DistributedContext | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    gloo on CPU, nccl on CUDA, each rank on cuda:LOCAL_RANK. None when not launched with more
    than one process. An already initialised default group is reused."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launched_world_size()
    if world <= 1:
        return None
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def local_device(device: "torch.device | None" = None) -> torch.device:
    """Under torchrun, an unnumbered CUDA device (or None with CUDA present) is this process's
    cuda:LOCAL_RANK; anything else is kept (None without CUDA is the CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def data_parallel(context: DistributedContext | None) -> Iterator[None]:
    """Within the block, `global_firing` / `global_min` reduce across the ranks of `context`."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, context
    try:
        yield
    finally:
        _ACTIVE = previous


def active() -> DistributedContext | None:
    return _ACTIVE


def global_firing(fired: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, int]:
    """(latents that fired on any rank, tokens in the global batch)."""
    if _ACTIVE is None:
        return fired, n_tokens
    counts = fired.to(torch.int32)
    dist.all_reduce(counts)
    return counts > 0, n_tokens * _ACTIVE.world_size


def global_min(value: torch.Tensor) -> torch.Tensor:
    """The minimum over ranks (identity outside data-parallel training)."""
    if _ACTIVE is None:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def share_weight() -> int:
    """Multiply a loss normalised by a global-batch statistic by this, so that the gradients
    averaged over ranks equal those of the global batch (1 outside data-parallel training)."""
    return 1 if _ACTIVE is None else _ACTIVE.world_size


def global_centred_sum_sq(rows: torch.Tensor) -> torch.Tensor:
    """sum ||row - mean row||^2 over the global batch (no gradient)."""
    rows = rows.detach()
    if _ACTIVE is None:
        return (rows - rows.mean(0)).pow(2).sum()
    rows64 = rows.double()  # one-pass variance: accumulate in float64
    sums = torch.cat([rows64.sum(0), rows64.pow(2).sum().reshape(1), rows64.new_tensor([len(rows)])])
    dist.all_reduce(sums)
    total, squares, count = sums[:-2], sums[-2], sums[-1]
    return (squares - total.pow(2).sum() / count).to(rows.dtype)


def average_gradients(parameters: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce the mean gradient in one flat buffer (a missing gradient counts as zeros, so
    every rank takes part in the same collective whatever its batch did)."""
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        # copy_ keeps each gradient's own layout (e.g. a transposed encoder weight).
        p.grad = g.copy_(flat[offset:offset + n].view_as(g)) if p.grad is not None else flat[offset:offset + n].view_as(p).clone()
        offset += n


def mean_over_ranks(values: dict[str, torch.Tensor], context: DistributedContext | None) -> dict[str, float]:
    """Logged scalars averaged over ranks (each rank's loss is on its share of the batch)."""
    if not values:
        return {}
    stacked = torch.stack([v.float().reshape(()) for v in values.values()])
    if context is not None:
        dist.all_reduce(stacked)
        stacked /= context.world_size
    return dict(zip(values, stacked.tolist()))


def check_same_step(step: int, device: torch.device) -> None:
    """Every rank must resume from the same step (a checkpoint all of them can read)."""
    steps = torch.tensor([step, -step], device=device)  # nccl reduces device tensors only
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if int(steps[0]) != -int(steps[1]):
        raise ConfigError(f"ranks resume from different steps ({-int(steps[1])}..{int(steps[0])}): the output "
                          "directory must be on a filesystem every node sees")


def resync_if_diverged(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Rank 0's parameters, buffers and optimiser state everywhere, if any rank's parameters
    differ (methods that resample dead latents from their own share of the batch); True if so.

    The check is one small all-reduce of per-tensor sums."""
    params = list(module.parameters())
    sums = torch.stack([p.detach().double().sum() for p in params])
    extremes = torch.cat([sums, -sums])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if torch.equal(extremes[:len(params)], -extremes[len(params):]):
        return False
    broadcast_module(module)
    for state in (optimizer.state[p] for p in params):
        for value in state.values():
            if torch.is_tensor(value):
                _broadcast_in_place(value)
    return True


def _broadcast_in_place(tensor: torch.Tensor, src: int = 0) -> None:
    if tensor.is_contiguous():
        dist.broadcast(tensor, src)
    else:  # collectives need contiguous memory (e.g. the transposed-layout encoder weight)
        copy = tensor.contiguous()
        dist.broadcast(copy, src)
        tensor.copy_(copy)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            _broadcast_in_place(tensor.data, src)


def is_main_process() -> bool:
    """Rank 0 of an initialised process group, or a plain single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group (end of a torchrun command). After a command that finished, every rank
    first waits at a barrier: a rank that tears gloo down while its peer still talks to it can abort the
    peer ("terminate called without an active exception", seen in 1 CI run). After an error the peers may
    never arrive, so the group is left at once."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
