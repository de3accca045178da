"""Copies between the host and a GPU that do not wait for the work already queued on the device.

Only the copies: choosing a device is `distributed.resolve_device`'s job, sampling and stepping
are `sampling`'s and `generate`'s. On the CPU every helper here is a plain copy or none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def host_to_device(
    values: Sequence[int] | Sequence[float] | Sequence[bool] | Sequence[Sequence[float]],
    device: torch.device,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for work queued on a GPU.

    torch.tensor(..., device="cuda") copies from pageable memory and waits for the stream;
    from pinned memory the copy is queued like a kernel (the host allocator keeps the buffer
    until the copy has run).
    """
    on_gpu = device.type == "cuda"
    # Lists only: torch.tensor refuses to pin a NumPy array ("Can't pin tensor constructed
    # from numpy").
    tensor = torch.tensor(values, dtype=dtype, pin_memory=on_gpu)
    return tensor.to(device, non_blocking=True) if on_gpu else tensor


class HostCopy:
    """A device tensor's copy to the host, started now; `tolist()` waits for the copy alone.

    On a GPU the copy goes into pinned memory behind the work queued so far, and an event marks
    its end, so work queued after it (the next decode step) keeps the device busy meanwhile.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        self._host = tensor
        if tensor.device.type == "cuda":
            self._host = tensor.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def tolist_after_queueing(tensor: torch.Tensor, queue_next: Callable[[], T]) -> tuple[list, T]:
    """tensor's values on the host, and what `queue_next()` returned: running ahead.

    The copy starts first, then `queue_next` hands the device its next step, and only then does
    the host wait, for the copy alone: the device computes while the host handles the values.
    Copying after queueing would put the copy, and the host's wait, behind that whole step.
    """
    copy = HostCopy(tensor)
    queued = queue_next()
    return copy.tolist(), queued
