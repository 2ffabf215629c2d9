"""split_on_oom: an out-of-memory batch is halved and retried, results in order, the splits reported."""

import pytest
import torch

from kl_autoencoder.inference.oom import is_out_of_memory, split_on_oom


def test_halves_until_it_fits_and_keeps_order():
    calls, splits = [], []

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        if t.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return t * 2

    x = torch.arange(7.0)[:, None]
    out = torch.cat(split_on_oom(fn, x, on_split=lambda b, h: splits.append((b, h))))
    assert torch.equal(out, x * 2)
    assert splits == [(7, 4), (4, 2), (3, 2)]
    assert calls == [7, 4, 2, 2, 3, 2, 1]


def test_a_real_cpu_allocation_failure_counts_as_out_of_memory():
    with pytest.raises(RuntimeError) as e:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: the CPU allocator refuses
    assert is_out_of_memory(e.value)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_other_errors_and_a_single_item_are_raised():
    with pytest.raises(ValueError):
        split_on_oom(lambda t: (_ for _ in ()).throw(ValueError("bug")), torch.zeros(4, 1))
    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(lambda t: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), torch.zeros(1, 1))
