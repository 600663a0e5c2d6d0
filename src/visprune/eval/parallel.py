"""The processes an evaluation runs in: one, or several under `accelerate launch` / `torchrun` (data parallel).

accelerate starts the processes and their process group; visprune only asks which process it is, on
which device, and gathers each cell's per-item records onto every process. Batches are dealt out whole
(batch i to process i mod N), so every batch holds exactly the items it holds in a single-process run and
the results are the same item by item.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from visprune.errors import InputError


@dataclass(frozen=True)
class Processes:
    """This process's place among the evaluation's processes."""

    index: int = 0
    count: int = 1
    device: str | None = None  # the device accelerate assigned (None: a single process chooses its own)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def owns(self, batch: int) -> bool:
        """Whether batch number `batch` is evaluated by this process."""
        return batch % self.count == self.index

    def gather(self, records: list[Any]) -> list[Any]:
        """Every process's `records`, concatenated in process order, on every process."""
        if self.count == 1:
            return records
        from accelerate.utils import gather_object

        return gather_object(records)

    def wait(self) -> None:
        """Wait until every process gets here."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def current() -> Processes:
    """The processes of this run: accelerate's state under `accelerate launch` (or `torchrun`), one process
    otherwise. Without a GPU (or with ACCELERATE_USE_CPU set) the processes run on the CPU and talk
    through gloo."""
    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    if not cpu:
        _check_a_gpu_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
    state = PartialState(cpu=cpu)
    if state.num_processes == 1:
        return Processes()
    return Processes(index=state.process_index, count=state.num_processes, device=str(state.device))


def _check_a_gpu_per_process(processes: int, gpus: int) -> None:
    """Each process of a GPU evaluation runs on its own GPU: refuse more processes on one machine than it has
    GPUs (the extra ones would ask for a device that does not exist)."""
    if processes > gpus:
        raise InputError(
            f"{processes} evaluation processes were launched on this machine, but it has {gpus} GPU(s) and each "
            f"process needs its own: launch at most {gpus} (accelerate launch --num_processes {gpus}), or run the "
            "processes on the CPU (ACCELERATE_USE_CPU=1, or --cpu for accelerate launch)"
        )
