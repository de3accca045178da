"""The torchrun / PyTorchJob environment, process group setup and teardown, small collectives.

Reads the launcher's environment and nothing else; it must not build models or know the trainer.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
# The longest a collective may be told to wait: a timedelta of much more overflows (inf, 1e300),
# and a year is longer than any wait that means something.
MAX_TIMEOUT_S = 365 * 86400.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# (this process, its parent) when this module was first imported: under torchrun, the parent is
# the launcher (torchrun exports no pid of its own).
_IMPORTED_IN = (os.getpid(), os.getppid())


class DistributedEnvError(RuntimeError):
    """The launcher's environment is inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, rank on its node, rendezvous address.

    Under torchrun the child environment is authoritative (RANK, WORLD_SIZE, LOCAL_RANK, ...).
    A PyTorchJob pod started without torchrun gets RANK / WORLD_SIZE / MASTER_* per pod, one
    process per pod. Without any of these it is a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        under_torchrun = "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env
        world_size = _int(env, "WORLD_SIZE", 1)
        rank = _int(env, "RANK", 0)
        local_rank = _int(env, "LOCAL_RANK", 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", 1)
        # A pod's RANK/WORLD_SIZE count pods; with several processes per pod only torchrun
        # (which reads the PET_* variables) can hand out the per-process ranks. torchrun has
        # read PET_NPROC_PER_NODE itself, which may also be auto, gpu or cpu.
        per_node = env.get("PET_NPROC_PER_NODE", "1").strip()
        if not under_torchrun and per_node not in ("1", "auto", "cpu", "gpu"):
            raise DistributedEnvError(
                f"PET_NPROC_PER_NODE={per_node}: start the trainer under torchrun "
                "(torchrun reads PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT)"
            )
        if world_size < 1:
            raise DistributedEnvError(f"WORLD_SIZE must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise DistributedEnvError(f"RANK must be in [0, {world_size}), got {rank}")
        if not 0 <= local_rank < max(local_world, 1) and under_torchrun:
            raise DistributedEnvError(f"LOCAL_RANK {local_rank} >= LOCAL_WORLD_SIZE {local_world}")
        addr = env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR") or "127.0.0.1"
        port_env = "MASTER_PORT" if "MASTER_PORT" in env else "PET_MASTER_PORT"
        port = _int(env, port_env, 29500)
        if world_size > 1 and "MASTER_ADDR" not in env:
            raise DistributedEnvError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set")
        return cls(rank, world_size, local_rank, local_world, addr, port)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedEnvError(f"{name} must be an integer, got {raw!r}") from None


def stop_with_launcher(environ: Mapping[str, str] | None = None) -> None:
    """Under torchrun on Linux, have the kernel SIGTERM this rank when its launcher dies.

    torchrun SIGTERMs its ranks when it is stopped, but a SIGKILLed torchrun (kill -9, the OOM
    killer) left them training and writing the checkpoint dir that a restarted job uses too.
    They get the SIGTERM torchrun would have sent, and stop as they do on it. A launcher gone
    already sends nothing, so then this raises instead. A no-op elsewhere.
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    launcher = _launcher_pid()
    if os.getppid() != launcher:  # adopted: the launcher died before the prctl
        raise DistributedEnvError(f"the launcher (pid {launcher}) of this rank is gone; "
                                  "not training on without it")  # fmt: skip


def _launcher_pid() -> int:
    """The process that started this one: the parent seen at import, or, in a child forked
    after the import, the process that imported."""
    pid, parent = _IMPORTED_IN
    return parent if pid == os.getpid() else pid


def resolve_device(requested: str, env: DistEnv) -> torch.device:
    """`auto`: this process's GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedEnvError("device 'cuda' requested but CUDA is not available")
        if device.index is None:  # one process per GPU
            device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_process_group(
    env: DistEnv, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """NCCL for GPUs, gloo for CPUs; a no-op for a single process or an existing group."""
    if not env.is_distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this GPU eagerly
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{_host(env.master_addr)}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(
    device: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> Iterator[tuple[DistEnv, torch.device]]:
    """Set up this process's place in the job; the group is destroyed even when the body fails."""
    stop_with_launcher(environ)
    env = DistEnv.from_env(environ)
    dev = resolve_device(device, env)
    init_process_group(env, dev, timeout_s)
    try:
        yield env, dev
    finally:
        destroy_process_group()


# -- collectives that are no-ops for one process ------------------------------------------------


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


@dataclass(frozen=True)
class Agreed:
    """What every rank agreed on: whether any rank wants to stop, and the longest elapsed time."""

    stop: bool
    elapsed_s: float


class StopVote:
    """Whether any rank wants to stop (and how long the slowest has run), agreed without waiting.

    Each call starts an all-reduce (max) of this step's flag and elapsed seconds on a CPU (gloo)
    group and returns the previous call's result, so every rank sees the same answer at the same
    step, one step after the flag. A device all-reduce read with .item() would make the host wait
    every step for all of the step's kernels, so it could not queue the next step meanwhile.
    The first call has no earlier vote to return and answers `start`, which must be the same on
    every rank (a resumed run's elapsed time, from the checkpoint every rank loaded): each
    rank's own values would differ, and ranks that disagree on the LR or on stopping diverge or
    hang. One process: this call's own values. Every rank must create it and call it at the
    same points.
    """

    def __init__(self, start: Agreed = Agreed(False, 0.0)) -> None:
        self._start = start
        self._group: Any = None
        self._pending: tuple[torch.Tensor, Any] | None = None
        self.lag = 1 if active() else 0  # calls between a vote and the call that returns it
        if active():
            # Its own CPU group (collective: every rank creates it), so votes never interleave
            # with the training's collectives, and never touch a GPU.
            self._group = dist.new_group(backend="gloo")

    def __call__(self, flag: bool, elapsed_s: float = 0.0) -> Agreed:
        if not active():
            return Agreed(flag, elapsed_s)
        vote = torch.tensor([float(flag), elapsed_s], dtype=torch.float64)
        work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        previous, self._pending = self._pending, (vote, work)
        if previous is None:
            return self._start
        previous[1].wait()
        return Agreed(bool(previous[0][0] > 0), float(previous[0][1]))

    def close(self) -> None:
        """Wait for the last vote (every rank started it) so no collective outlives the loop."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None


def mean_across_ranks(value: torch.Tensor | float, device: torch.device) -> float:
    t = torch.as_tensor(value, dtype=torch.float32, device=device).detach().clone().reshape(1)
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Rank src's `obj` on every rank (of `group`, default: all; pickled by torch.distributed,
    small objects only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (of `group`, default: all)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def patient_group(timeout_s: float) -> Any:
    """A CPU (gloo) group whose collectives wait up to `timeout_s`, or None for one process.

    For ranks that wait on another rank's long work (the first tokenization of a corpus), which
    the default group's timeout, sized for training steps, would cut short. Collective: every
    rank creates it at the same point, before that work starts, as creating it later would wait
    within the default group's timeout too. It lives until destroy_process_group().
    """
    if not active():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
