"""Out of memory in the middle of a batch job: halve the batch and go on, instead of losing the job.

The memory plan (``memory_plan.py``) is an estimate; a GPU shared with another process, allocator
fragmentation or a larger image than the rest can still run out. ``split_on_oom`` runs a batch, and on an
out-of-memory error frees the cached blocks and runs each half, down to single items; what it had to do is
reported through ``on_split`` (the encode job counts it in its manifest).
"""

from __future__ import annotations

import gc
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's ``OutOfMemoryError``, or what accelerate's batch-size finder treats as out of memory (the
    messages of CUDA/HIP/XPU/MPS and the CPU allocator: ``accelerate.utils.memory.should_reduce_batch_size``)."""
    from accelerate.utils.memory import should_reduce_batch_size

    # torch.cuda.OutOfMemoryError: torch.OutOfMemoryError is its alias only from torch 2.5 (we allow 2.4)
    return isinstance(e, torch.cuda.OutOfMemoryError) or should_reduce_batch_size(e)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # the batch may sit on the CPU, the model not
        torch.cuda.empty_cache()


def split_on_oom(fn: Callable[[torch.Tensor], T], x: torch.Tensor, *,
                 on_split: Callable[[int, int], None] | None = None) -> list[T]:
    """``[fn(x)]``, or on out-of-memory the results of ``fn`` on the halves of ``x`` (dim 0), recursively, in order.

    ``on_split(batch, half)`` is called at each halving. A single item that still runs out re-raises.
    """
    try:
        return [fn(x)]
    except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; anything else re-raises below
        if not is_out_of_memory(e) or x.shape[0] <= 1:
            raise
    _free()
    half = (x.shape[0] + 1) // 2
    if on_split is not None:
        on_split(x.shape[0], half)
    return split_on_oom(fn, x[:half], on_split=on_split) + split_on_oom(fn, x[half:], on_split=on_split)
