"""Scale-out on PyTorch's own engine: `torchrun` starts the processes, this module joins them up.

    torchrun --nproc_per_node 2 -m lmforge pretrain --config recipes/demo.yaml --out runs/ddp
    torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:29500 --nproc_per_node 8 -m lmforge pretrain ...

Every process runs the same command. DDP (the default) keeps a full replica per
process and averages gradients; FSDP (`--fsdp`, FSDP2's `fully_shard`) shards
parameters, gradients and optimizer state across processes. gloo on CPU, nccl
on CUDA. Rank 0 alone logs, evaluates and writes the run folder; every rank
trains on its own rows of each global batch, so a run on N processes takes the
same steps as a run on one with the same global batch.

Checkpoints hold full (unsharded) tensors with parameter names as keys, so a
checkpoint written by 1, 2 or 8 processes, DDP or FSDP, resumes on any of them.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.train.optim import Optimizers


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def join(device: str = "auto") -> torch.device:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); return this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or (dist.is_initialized()):
        return pick_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
        dist.init_process_group("nccl", device_id=chosen)
    elif chosen.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise UserError(f"distributed training runs on CUDA (nccl) or CPU (gloo), not {chosen.type}")
    return chosen


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def launched(out: Path, device: str = "auto") -> Iterator[tuple[Path, str]]:
    """(run folder, device) for this process of a command that torchrun may have started N times.

    Rank 0 gets the real run folder; the other ranks get a scratch folder that is deleted at
    the end, so the task code every rank runs can write freely without two ranks writing one file.
    """
    chosen = join(device)
    try:
        if world().main:
            yield out, str(chosen)
        else:
            with tempfile.TemporaryDirectory(prefix=f"lmforge-rank{world().rank}-") as scratch:
                yield Path(scratch), str(chosen)
    finally:
        leave()


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 does the work first (training a tokenizer, filling a cache); the others then find it done."""
    if not world().main:
        barrier()
    yield
    if world().main:
        barrier()


def mean(value: float) -> float:
    """The mean of a number over all processes (e.g. each rank's loss on its rows)."""
    if world().size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / world().size


def broadcast(value: Any) -> Any:
    """Rank 0's value of any picklable object, on every rank (rank 0 decides; the others follow)."""
    if world().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rows_of_rank(batch: Any) -> Any:
    """This rank's share of a global batch: rows rank, rank + size, ... of every tensor (dim 0).

    Packed rows (chat SFT) need not divide evenly; each process then averages over its own rows.
    """
    here = world()
    if here.size == 1:
        return batch
    if torch.is_tensor(batch):
        if batch.shape[0] < here.size:
            raise UserError(f"a batch of {batch.shape[0]} rows cannot feed {here.size} processes: raise batch_size")
        return batch[here.rank :: here.size]
    if isinstance(batch, (tuple, list)):
        return type(batch)(rows_of_rank(item) for item in batch)
    if isinstance(batch, dict):
        return {key: rows_of_rank(value) for key, value in batch.items()}
    return batch


def _state_dicts() -> Any:
    """torch.distributed.checkpoint.state_dict, imported on first use: it takes about a second to import, which every
    lmforge command that never trains (generate, eval, serve, --help) would otherwise pay at start-up."""
    import torch.distributed.checkpoint.state_dict as state_dicts

    return state_dicts


class Replicas:
    """The model as the training step sees it (a DDP wrapper, or an FSDP-sharded copy) beside the plain model.

    With DDP the wrapper shares the plain model's parameters. With FSDP a sharded copy
    trains while the plain model waits on the CPU; `finish` gathers the trained weights
    back into it, so callers keep one ordinary nn.Module before and after training.
    """

    def __init__(self, model: nn.Module, fsdp: bool = False) -> None:
        self.plain = model
        self.fsdp = fsdp and world().size > 1
        self.device = next(model.parameters()).device
        if world().size == 1:
            self.training = model
        elif self.fsdp:
            self.training = copy.deepcopy(model)
            from torch.distributed.fsdp import fully_shard

            for layer in getattr(self.training, "layers", []):
                fully_shard(layer)  # one all-gather per block: only a block's full weights exist at a time
            fully_shard(self.training)
            model.to("cpu")
        else:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.training = DistributedDataParallel(model, device_ids=device_ids)

    @property
    def evaluated(self) -> nn.Module:
        """What evaluation runs on: the plain model (DDP, one process) or the sharded one (FSDP, every rank)."""
        return self.training if self.fsdp else self.plain

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full weights by parameter name (on rank 0; other ranks get {} when sharded)."""
        if world().size == 1:
            return self.plain.state_dict()
        api = _state_dicts()
        return api.get_model_state_dict(
            self.training, options=api.StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def full_optimizer_state(self, optimizer: Optimizers) -> dict[str, Any]:
        """{"state": {parameter name: {exp_avg, ...}}, "param_groups": [...]}: full tensors, names not indices.

        With two optimizers (Muon + AdamW) this is one state: every parameter belongs to exactly one of them.
        """
        api = _state_dicts()
        options = api.StateDictOptions(full_state_dict=True, cpu_offload=world().size > 1)
        return api.get_optimizer_state_dict(self.training, optimizer.parts, options=options)

    def load_full_state(self, model_state: dict, optimizer: Optimizers, optimizer_state: dict) -> None:
        """Restore weights and optimizer from full state dicts that rank 0 read; the other ranks pass {}."""
        api = _state_dicts()
        options = api.StateDictOptions(full_state_dict=True, broadcast_from_rank0=world().size > 1)
        api.set_model_state_dict(self.training, model_state, options=options)
        api.set_optimizer_state_dict(self.training, optimizer.parts, optimizer_state, options=options)

    def finish(self) -> nn.Module:
        """The plain model with the trained weights (FSDP: gathered from the shards on every rank)."""
        if self.fsdp:
            api = _state_dicts()
            full = api.get_model_state_dict(self.training, options=api.StateDictOptions(full_state_dict=True))
            self.plain.load_state_dict(full)
            self.plain.to(self.device)
        return self.plain
