"""Load a checkpoint of any model family visprune supports with transformers, on this process's device.

Under `accelerate launch` (or `torchrun`) lmms-eval deals documents out by rank and each process holds
one model on its own device, as lmms-eval's own wrappers do: cuda:<local rank>, or the CPU when there is
no GPU, device=cpu is given or ACCELERATE_USE_CPU is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from visprune import bundled
from visprune.errors import InputError, UnsupportedModelError
from visprune.models import supported_model_classes


@dataclass
class Loaded:
    """The model, its processor, where it runs and the accelerate state of this process."""

    model: Any
    processor: Any
    device: torch.device
    accelerator: Any
    rank: int
    world_size: int


def accelerator_for(device: str) -> Any:
    """accelerate's Accelerator, which lmms-eval's evaluator uses to wait for and gather over processes (its
    CLI makes one first; this one shares that state). Made here first, under several CPU processes it sets
    up their gloo group."""
    from accelerate import Accelerator

    cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return Accelerator(cpu=cpu or not torch.cuda.is_available())


def process_group() -> tuple[int, int, int]:
    """(rank, world size, local rank) as lmms-eval deals documents out: torch.distributed's group where one
    is set up, else the launcher's RANK / WORLD_SIZE (lmms-eval reads the same; accelerate's state can say
    "one process" on CPUs although the launcher started several)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local


def choose_device(device: str, world_size: int, local_rank: int) -> torch.device:
    """One process: `device` ('auto': CUDA when available). Several: GPU `local_rank` (one per process, as
    lmms-eval's own wrappers), or the CPU (device=cpu, or no GPU); a fixed cuda:N would put every process on
    one GPU and is refused."""
    if world_size == 1:
        return torch.device(bundled.resolve_device(device))
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if device not in ("auto", "cuda"):
        raise InputError(
            f"device={device!r} under {world_size} processes would put them all on one device; leave device "
            "unset (each process takes its own GPU) or use device=cpu"
        )
    return torch.device(f"cuda:{local_rank}")


def torch_dtype(name: str | None, device: torch.device) -> Any:
    """The dtype to load the weights in: default float32 on the CPU, the checkpoint's own ('auto') elsewhere."""
    if name is None:
        name = "float32" if device.type == "cpu" else "auto"
    return name if name == "auto" else getattr(torch, name)


def load(pretrained: str, device: str = "auto", dtype: str | None = None, attn: str | None = None) -> Loaded:
    """Load `pretrained` ('tiny-llava': the bundled model; a checkpoint folder; a hub id) for evaluation:
    AutoModelForImageTextToText picks the class, which must be one visprune supports; the processor pads
    on the left for batched generation."""
    from transformers import AutoModelForImageTextToText

    source = bundled.resolve(pretrained)
    accelerator = accelerator_for(device)
    rank, world_size, local_rank = process_group()
    where = choose_device(device, world_size, local_rank)
    config = bundled.load_config(source)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    supported = supported_model_classes()
    if architecture is not None and architecture not in supported:
        raise UnsupportedModelError(
            f"{source} is a {architecture} checkpoint; visprune supports {', '.join(supported)}"
        )
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, where)}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    model, processor = bundled.load_pretrained(source, AutoModelForImageTextToText, where, **kwargs)
    processor.tokenizer.padding_side = "left"
    return Loaded(model, processor, where, accelerator, rank, world_size)
