"""Moving small tensors between host and device without waiting for the device's queue: a device result
read on the host behind the work that computes it (`StagedRead`), a host tensor copied to the device
(`host_to_device`)."""

from __future__ import annotations

import torch
from torch import Tensor


class StagedRead:
    """A copy of `tensor` to the host, started where it is created: behind the work that computes the tensor
    (into pinned memory, without blocking, marked by a CUDA event). `value()` then waits for that work only,
    not for what the host launched in between, so the device stays busy while the host reads. On the CPU
    the tensor is its own host copy."""

    def __init__(self, tensor: Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def value(self) -> Tensor:
        """The host copy, once the device has written it."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


def host_to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without waiting for the device's queue (a pinned, non-blocking copy on
    CUDA: a copy from pageable memory may wait for the work queued before it)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
