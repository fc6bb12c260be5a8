"""Process-group set-up and the few collectives the programmes need.

Launchers are recognised from their environment variables, as the original ``main.py`` does:

* ``torchrun`` or ``python -m torch.distributed.launch --use_env``: ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* SLURM (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the rendezvous
  address comes from ``MASTER_ADDR``/``MASTER_PORT`` or ``--dist_url``, and defaults to this
  host for single-node jobs.

The backend is NCCL for CUDA devices and Gloo otherwise, so multi-process runs also work on
CPU (the original hard-codes NCCL and CUDA tensors). Every helper works without a process
group too, where it is the identity (or the one-process answer).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedSetupError",
    "all_gather_object",
    "barrier",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed_mode",
    "is_dist_avail_and_initialized",
    "is_main_process",
    "reduce_dict",
]

logger = logging.getLogger(__name__)

# Single-node SLURM jobs without MASTER_ADDR/MASTER_PORT rendezvous on this host and port.
_SLURM_DEFAULT_ADDR = "127.0.0.1"
_SLURM_DEFAULT_PORT = "29500"


class DistributedSetupError(RuntimeError):
    """The launcher's environment does not describe a usable process group."""


def is_dist_avail_and_initialized() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """Rank of this process (0 without a process group)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0, the process that writes files and logs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_dist_avail_and_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """Device that tensors handed to collectives must live on (CUDA for NCCL, else CPU)."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError as err:
        raise DistributedSetupError(
            f"environment variable {name}={os.environ[name]!r} is not an integer"
        ) from err


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the process group described by the environment, if any.

    Sets the attributes the original stores in its checkpoints' ``args``: ``distributed``,
    ``rank``, ``world_size``, ``gpu`` (local rank) and, when distributed, ``dist_backend``.
    Without launcher variables the run is a single process and nothing is initialised.

    Raises:
        DistributedSetupError: inconsistent variables, a CUDA device index that does not
            exist, or a rendezvous that fails.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = _env_int("RANK")
        args.world_size = _env_int("WORLD_SIZE")
        args.gpu = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    elif "SLURM_PROCID" in os.environ:
        args.rank = _env_int("SLURM_PROCID")
        if "SLURM_NTASKS" in os.environ:
            args.world_size = _env_int("SLURM_NTASKS")
        if "SLURM_LOCALID" in os.environ:
            args.gpu = _env_int("SLURM_LOCALID")
        else:
            args.gpu = args.rank % max(1, torch.cuda.device_count())
        if args.dist_url == "env://" and "MASTER_ADDR" not in os.environ:
            if os.environ.get("SLURM_NNODES", "1") != "1":
                raise DistributedSetupError(
                    "multi-node SLURM job: set MASTER_ADDR and MASTER_PORT (the first node's "
                    "address and a free port) or pass --dist_url"
                )
            os.environ["MASTER_ADDR"] = _SLURM_DEFAULT_ADDR
            os.environ.setdefault("MASTER_PORT", _SLURM_DEFAULT_PORT)
    else:
        args.distributed = False
        args.rank = 0
        args.world_size = 1
        args.gpu = 0
        return

    if not 0 <= args.rank < args.world_size:
        raise DistributedSetupError(f"rank {args.rank} is outside world size {args.world_size}")

    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedSetupError("--device cuda was asked for but CUDA is not available")
        if args.gpu >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"local rank {args.gpu} has no GPU: only {torch.cuda.device_count()} visible"
            )
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    args.distributed = True
    logger.debug(
        "joining process group: rank %d of %d, backend %s, %s",
        args.rank,
        args.world_size,
        args.dist_backend,
        args.dist_url,
    )
    try:
        dist.init_process_group(
            backend=args.dist_backend,
            init_method=args.dist_url,
            world_size=args.world_size,
            rank=args.rank,
            timeout=datetime.timedelta(minutes=30),
        )
    except (ValueError, RuntimeError) as err:
        raise DistributedSetupError(
            f"could not initialise torch.distributed ({args.dist_backend}, {args.dist_url}): {err}"
        ) from err
    barrier()


def cleanup_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def reduce_dict(values: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum (or average) a dict of scalar tensors over all ranks; every rank gets the result.

    The keys must be the same on every rank. Works with Gloo (CPU) and NCCL (CUDA): the values
    are moved to the backend's device for the collective and the result comes back detached on
    the device of the first value. With one process the dict is returned unchanged.
    """
    world_size = get_world_size()
    if world_size < 2 or not values:
        return values
    names = sorted(values)
    out_device = values[names[0]].device
    with torch.no_grad():
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
        stacked = stacked.to(collective_device())
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        stacked = stacked.to(out_device)
    return {k: v for k, v in zip(names, stacked, strict=True)}


def all_gather_object(obj: Any) -> list[Any]:
    """Picklable ``obj`` from every rank, in rank order (``[obj]`` without a process group)."""
    world_size = get_world_size()
    if world_size < 2:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered
