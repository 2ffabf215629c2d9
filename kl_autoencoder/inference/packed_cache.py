"""Per-module caches of packed or transformed weights (``winograd.py``, ``bf16.py``).

oneDNN-packed weights cannot be copied or pickled, and transformed ones are derived data: a copied or
pickled module gets an empty cache and repacks on first use, so ``copy.deepcopy(vae)`` and
``torch.save(vae)`` work on an optimised model and never carry stale weights.
"""

from __future__ import annotations

import torch


def weight_key(w: torch.Tensor) -> tuple:
    """What identifies a weight's contents for its packed copies: its data pointer and version counter (a
    replaced or in-place modified weight changes one of them); inference tensors have no version counter."""
    return (w.data_ptr(), None if w.is_inference() else w._version)


class PackedCache(dict):
    """A dict that copies and pickles as empty."""

    def __deepcopy__(self, memo) -> "PackedCache":
        return PackedCache()

    def __reduce__(self):
        return (PackedCache, ())
